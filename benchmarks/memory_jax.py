"""XLA's compiled memory of one selective step at Llama shapes: ``python -m benchmarks.memory_jax``.

One jitted ``update + apply_updates`` step with params and optimizer state donated, as in a
training loop, compiled for ``jax.ShapeDtypeStruct`` inputs with the shapes of a Llama
configuration (bf16 by default): nothing of model size is allocated, so the 7B shapes compile
on a laptop. Read from ``compiled.memory_analysis()``:

* peak = arguments + outputs + temporaries - donated (aliased) bytes, XLA's own accounting of
  the step's high-water mark on the device (excluding the forward/backward pass that made the
  gradients, which is the same for every case);
* temp = temporaries alone;
* XLA peak = ``peak_memory_in_bytes``, XLA's own estimate from buffer liveness (where the
  backend reports it); it can be lower than the sum above, which counts the whole temporary
  allocation the runtime reserves;
* state = bytes of the optimizer state (from ``jax.eval_shape`` of ``init``).

``jax_rows(preset)`` returns the rows as dicts (``case``, ``peak_bytes``, ``temp_bytes``,
``state_bytes``, ``step_s``: None, nothing is run); the torch-side memory benchmark imports it.

``--measure`` runs real training steps instead (:func:`measure`): the Flax NNX Llama of
``examples/llm_flax.py`` at a preset (``tiny``, ``200m``, ``1b``), bf16 parameters, sequence
256, batch 1, gradient checkpointing (``nnx.remat`` per block), a few jitted steps (loss, grad,
update, apply) with params and optimizer state donated, one device. Each case runs in its own
subprocess; *extra peak* is the high-water mark of resident memory while the optimizer state is
created and the steps run, minus resident memory after building the model and compiling the
step and returning free heap pages with ``malloc_trim(0)`` (XLA's compiler memory is not
counted: torch has no compile). Cases: full ``optax.adamw`` and ``selective_id3(budget, 100,
inner=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(...)))`` in compact form,
budget 0.5%, so every measured step selects. Results of both modes are written with the
command, machine, date and commit::

    python -m benchmarks.memory_jax --measure --presets 200m --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_selective as osel
from benchmarks import common, runs
from benchmarks.proc_memory import MALLOC_ENV, hwm, reset_hwm, rss

# Llama configurations: hidden, layers, intermediate, vocabulary, heads, KV heads.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, layers=2, intermediate=176, vocab=512, heads=4, kv_heads=2),
    "200m": dict(hidden=1024, layers=12, intermediate=2816, vocab=32000, heads=16, kv_heads=4),
    "1b": dict(hidden=2048, layers=16, intermediate=5632, vocab=32000, heads=32, kv_heads=8),
    "7b": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32, kv_heads=32),
}
BASELINE = "optax.adamw"
BUDGET_FRAC = 0.005
MAX_STEPS = 100


def llama_shapes(preset: str, dtype: Any = jnp.bfloat16) -> dict:
    """A params pytree of ``ShapeDtypeStruct`` with a Llama model's shapes (untied lm_head)."""
    c = PRESETS[preset]
    h, f, v = c["hidden"], c["intermediate"], c["vocab"]
    kv = h // c["heads"] * c["kv_heads"]
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    layer = {
        "attn": {"q": s(h, h), "k": s(h, kv), "v": s(h, kv), "o": s(h, h)},
        "mlp": {"gate": s(h, f), "up": s(h, f), "down": s(f, h)},
        "attn_norm": s(h),
        "mlp_norm": s(h),
    }
    return {
        "embed": s(v, h),
        "layers": [layer] * c["layers"],
        "norm": s(h),
        "lm_head": s(h, v),
    }


def flat_shapes(preset: str, dtype: Any = jnp.bfloat16) -> dict:
    """:func:`llama_shapes` as one flat dict keyed by dotted paths (111 leaves at 200m), the
    layout of a PyTorch-style ``state_dict`` or a flattened Flax tree."""
    flat = jax.tree_util.tree_flatten_with_path(llama_shapes(preset, dtype))[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): x for path, x in flat}


TREES = {"nested": llama_shapes, "flat": flat_shapes}


def count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def cases(budget: int, max_steps: int = MAX_STEPS, lr: float = 1e-4, wd: float = 0.01) -> dict:
    adamw = lambda: optax.adamw(lr, weight_decay=wd)  # noqa: E731
    return {
        BASELINE: adamw(),
        "id3 compact": osel.selective_id3(budget, max_steps, inner=adamw()),
        "pafi compact": osel.selective_pafi(budget, inner=adamw()),
    }


def analyse(tx, params) -> dict:
    """Compiled memory of one step of ``tx`` on ``params`` (ShapeDtypeStructs) in its best
    layout: every argument order / donation layout of ``benchmarks.common.STEP_LAYOUTS`` is
    compiled and the one with the lowest peak is reported (``layout``; ``peak_by_layout``
    holds them all)."""
    state = jax.eval_shape(tx.init, params)
    layout, tried = common.best_layout(tx, params, state, params)
    best = next(t for t in tried if t["layout"] == layout)
    return {
        "peak_bytes": best["peak_bytes"],
        "temp_bytes": best["temp_bytes"],
        "xla_peak_bytes": best["xla_peak_bytes"],
        "layout": layout,
        "peak_by_layout": {t["layout"]: t["peak_bytes"] for t in tried},
        "state_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))),
        "step_s": None,
    }


def jax_rows(preset: str, dtype: Any = jnp.bfloat16, tree: str = "nested") -> list[dict]:
    """Compiled-memory rows for ``preset`` ("200m", "7b", ...): adamw, ID3 and PaFI compact,
    each in its best argument order / donation layout (:func:`analyse`).

    Each row: ``case``, ``peak_bytes``, ``temp_bytes``, ``state_bytes``, ``step_s`` (None:
    compiled, not run), ``params``, ``budget``, ``layout``, ``peak_by_layout``, ``tree``
    (``nested``: :func:`llama_shapes`; ``flat``: :func:`flat_shapes`) and ``ratio`` (peak /
    optax.adamw's best peak).
    """
    params = TREES[tree](preset, dtype)
    n = count(params)
    budget = max(1, int(n * BUDGET_FRAC))
    rows = []
    for name, tx in cases(budget).items():
        row = {"case": name, "preset": preset, "dtype": jnp.dtype(dtype).name, "params": n, "budget": budget,
               "tree": tree, "leaves": len(jax.tree.leaves(params))}
        row.update(analyse(tx, params))
        rows.append(row)
    base = rows[0]["peak_bytes"]  # optax.adamw in its best layout
    for r in rows:
        r["ratio"] = r["peak_bytes"] / base
    return rows


TARGETS = {"id3 compact": 0.7, "pafi compact": 0.67}


def targets(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["case"] in TARGETS:
            t = TARGETS[r["case"]]
            out.append(
                f"{r['case']} at {r['preset']} ({r['dtype']}, {r.get('tree', 'nested')} tree): {r['ratio']:.2f}x "
                "optax.adamw's best peak "
                f"(target <= {t}x): {'met' if r['ratio'] <= t else 'NOT met'}"
            )
    return out


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def markdown(rows: list[dict]) -> str:
    layouts = list(common.STEP_LAYOUTS)
    lines = [
        "| preset | tree | case | best layout | peak MiB | temp MiB | state MiB | peak / adamw's best | "
        + " | ".join(f"peak {k}" for k in layouts) + " | XLA peak MiB |",
        "|---|---|---|---|---:|---:|---:|---:|" + "---:|" * len(layouts) + "---:|",
    ]
    for r in rows:
        by = r.get("peak_by_layout") or {}
        lines.append(
            f"| {r['preset']} {r['dtype']} ({r['params'] / 1e6:,.1f}M) | {r.get('tree', 'nested')} "
            f"({r.get('leaves', '?')} leaves) | {r['case']} | {r.get('layout', 'gsp/sp')} | "
            f"{_mib(r['peak_bytes'])} | {_mib(r['temp_bytes'])} | {_mib(r['state_bytes'])} | {r['ratio']:.2f}x | "
            + " | ".join(_mib(by.get(k)) for k in layouts) + f" | {_mib(r.get('xla_peak_bytes'))} |"
        )
    return "\n".join(lines) + "\n"


def _commit() -> str | None:
    """HEAD, with ``+dirty`` if tracked files differ from it (None outside a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, check=True).stdout  # noqa: E731
        return git("rev-parse", "HEAD").strip() + ("+dirty" if git("status", "--porcelain", "-uno").strip() else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "optax": optax.__version__,
        "device": str(jax.devices()[0].device_kind),
    }


# ------------------------------------------------------------------------------ measured mode

MEASURED_CASES = ("optax.adamw", "id3 compact")



def _malloc_trim() -> None:
    """Returns glibc's free heap pages to the system (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measured_tx(case: str, budget: int, lr: float = 1e-4, wd: float = 0.01):
    """The optimizer of a measured ``case``: full ``optax.adamw``, or ID3 in compact form
    around clip-by-global-norm + AdamW (as ``examples/llm_flax.py`` trains)."""
    if case == "optax.adamw":
        return optax.adamw(lr, weight_decay=wd)
    if case == "id3 compact":
        inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=wd))
        return osel.selective_id3(budget, MAX_STEPS, inner=inner)
    raise ValueError(f"case={case!r} is not a measured case; choose from {', '.join(MEASURED_CASES)}.")


def measure_case(case: str, preset: str, steps: int, seq: int = 256, batch: int = 1, remat: bool = True) -> dict:
    """Runs ``steps`` training steps of ``case`` on the example's Llama at ``preset`` in this
    process and returns its measurements (call it in a fresh process: see :func:`measure`)."""
    from flax import nnx

    from examples import llm_flax

    if preset not in llm_flax.PRESETS:
        raise ValueError(f"preset={preset!r}: the measured mode runs examples/llm_flax.py's presets "
                         f"({', '.join(llm_flax.PRESETS)}); 7b is analysed only (drop --measure).")
    c = llm_flax.PRESETS[preset]
    # the example's FSDP annotations on a one-device mesh (nothing is split)
    mesh = jax.make_mesh((1,), (llm_flax.FSDP,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.use_eager_sharding(True):
        model = llm_flax.Llama(c, rngs=nnx.Rngs(0), remat=remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    n = count(params)
    budget = max(1, int(n * BUDGET_FRAC))
    tx = measured_tx(case, budget)
    tokens = np.random.default_rng(1).integers(0, c.vocab, (steps, batch, seq + 1)).astype(np.int32)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        init = jax.jit(tx.init).lower(params).compile()
        state_shapes = jax.eval_shape(tx.init, params)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state_shapes, tokens[0]).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gc.collect()
    untrimmed = rss()
    _malloc_trim()  # the compiler's freed heap would otherwise hide the step's small allocations
    base = rss()  # model built, step compiled: the optimizer state and the steps count
    exact = reset_hwm()
    t0 = time.perf_counter()
    state = init(params)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    times, losses = [], []
    for b in tokens:
        t0 = time.perf_counter()
        params, state, loss = compiled(params, state, b)
        losses.append(float(loss))  # waits for the step
        times.append(time.perf_counter() - t0)
    peak = hwm()
    later = times[1:] or times
    out = {
        "case": case, "preset": preset, "params": n, "budget": budget, "steps": steps, "seq": seq,
        "batch": batch, "remat": remat, "rss_after_build": base, "extra_peak": peak - base,
        "rss_before_trim": untrimmed, "hwm_reset": exact, "step_s": sorted(later)[len(later) // 2], "first_step_s": times[0],
        "init_s": init_s, "compile_s": compile_s, "state_bytes": tree_bytes(state),
        "xla_temp_bytes": int(m.temp_size_in_bytes), "losses": losses,
    }
    if case != "optax.adamw":
        out["budget_used"] = int(osel.budget_used(state))
    return out


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def _child(case: str, preset: str, steps: int, seq: int, timeout: float) -> dict:
    root = str(runs.ROOT)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=1"]),
               **MALLOC_ENV)
    cmd = [sys.executable, "-m", "benchmarks.memory_jax", "--child", case, "--presets", preset,
           "--steps", str(steps), "--seq", str(seq)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"case": case, "preset": preset, "error": f"timed out after {timeout:.0f}s"}
    if r.returncode != 0:
        return {"case": case, "preset": preset, "error": r.stderr.strip()[-800:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(presets: list[str], steps: int = 3, seq: int = 256, timeout: float = 3600, log=print) -> list[dict]:
    """Measured rows, each case of :data:`MEASURED_CASES` in its own subprocess, with ratios
    to ``optax.adamw`` in the same run (``peak_over_adamw``, ``step_over_adamw``,
    ``state_over_adamw``)."""
    rows = []
    for preset in presets:
        same = []
        for case in MEASURED_CASES:
            r = _child(case, preset, steps, seq, timeout)
            r["loadavg_after"] = os.getloadavg()[0]
            log(f"[memory_jax] {preset} {case}: " + (r.get("error", "")[-300:] or
                f"extra peak {r['extra_peak'] / 2**20:,.0f} MiB, step {r['step_s']:.2f} s, "
                f"state {r['state_bytes'] / 2**20:,.1f} MiB"))
            same.append(r)
        base = next((r for r in same if r["case"] == "optax.adamw" and "error" not in r), None)
        for r in same:
            if base is not None and "error" not in r:
                r["peak_over_adamw"] = r["extra_peak"] / base["extra_peak"]
                r["step_over_adamw"] = r["step_s"] / base["step_s"]
                r["state_over_adamw"] = r["state_bytes"] / base["state_bytes"]
        rows += same
    return rows


def measured_markdown(result: dict) -> str:
    info = result["run"]
    lines = [
        "# Measured memory of a bf16 Llama fine-tuning step (JAX, Flax NNX)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} cores "
        f"({result['machine']['device']}), jax {result['machine']['jax']}; load average at the start "
        f"{result['loadavg_start']:.1f}  ",
        runs.run_line(info).removeprefix("- ") + "  ",
        f"The Llama of `examples/llm_flax.py`, bf16 parameters, gradient checkpointing (`nnx.remat` per "
        f"block), sequence {result['seq']}, batch 1, {result['steps']} jitted steps (loss, grad, update, "
        "apply; params and state donated), one device, each case in its own process. Extra peak: peak "
        "resident memory while the optimizer state is created and the steps run, minus resident memory "
        "after building the model and compiling the step and `malloc_trim(0)` (row field "
        "`rss_after_build`). Step: median over steps 2..n. Budget "
        f"{BUDGET_FRAC:.1%}, ID3 max_steps {MAX_STEPS} (every measured step selects); ID3's inner is "
        "clip_by_global_norm(1.0) + adamw. Allocator: " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + ".",
        "",
        "| preset | params | case | extra peak | vs adamw | step | vs adamw | optimizer state | vs adamw | XLA temp |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    x = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | | {r['case']} | error: {r['error'][-160:]!r} | | | | | | |")
            continue
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:,.1f}M | {r['case']} | {_mib(r['extra_peak'])} MiB | "
            f"{x(r.get('peak_over_adamw'))} | {r['step_s']:.2f} s | {x(r.get('step_over_adamw'))} | "
            f"{r['state_bytes'] / 2**20:,.1f} MiB | {x(r.get('state_over_adamw'))} | {_mib(r['xla_temp_bytes'])} MiB |")
    return "\n".join(lines) + "\n"


def _main_measure(args, argv) -> dict:
    presets = args.presets.split(",")
    result = {
        "command": "python -m benchmarks.memory_jax " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "loadavg_start": os.getloadavg()[0], "run": runs.run_info(),
        "budget_frac": BUDGET_FRAC, "max_steps": MAX_STEPS, "seq": args.seq, "steps": args.steps,
        "rows": [],
    }

    def save() -> None:
        if args.out:
            runs.write_json(os.path.join(args.out, "memory_jax_measured.json"), result)
            with open(os.path.join(args.out, "memory_jax_measured.md"), "w") as f:
                f.write(measured_markdown(result))

    for preset in presets:  # saved after every preset, so a long run keeps what it measured
        result["rows"] += measure([preset], args.steps, args.seq)
        save()
    print(measured_markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_jax", description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="200m,7b", help="comma list of " + ", ".join(PRESETS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layouts", default=",".join(common.STEP_LAYOUTS),
                    help="comma list of the step layouts to compile (benchmarks.common.STEP_LAYOUTS)")
    ap.add_argument("--trees", default="nested,flat", help="comma list of " + ", ".join(TREES) +
                    " (the nested Flax-style tree, or one flat dict of dotted paths)")
    ap.add_argument("--out", default=None, help="folder for memory_jax.json / memory_jax.md "
                    "(--measure: memory_jax_measured.json / .md)")
    ap.add_argument("--measure", action="store_true",
                    help="run real training steps of examples/llm_flax.py's Llama and measure resident memory")
    ap.add_argument("--steps", type=int, default=3, help="--measure: training steps per case")
    ap.add_argument("--seq", type=int, default=256, help="--measure: sequence length")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure_case(args.child, args.presets.split(",")[0], args.steps, args.seq)))
        return {}
    if args.measure:
        return _main_measure(args, argv)
    commit = _commit()  # the code that runs: read before the (long) compiles
    unknown = set(args.layouts.split(",")) - set(common.STEP_LAYOUTS)
    if unknown:
        raise SystemExit(f"--layouts: unknown {sorted(unknown)}; choose from {', '.join(common.STEP_LAYOUTS)}.")
    for name in set(common.STEP_LAYOUTS) - set(args.layouts.split(",")):
        del common.STEP_LAYOUTS[name]  # this process compiles the chosen layouts only
    rows = []
    for preset in args.presets.split(","):
        for tree in args.trees.split(","):
            print(f"[memory_jax] {preset} {tree} ...", flush=True)
            rows += jax_rows(preset, jnp.dtype(args.dtype), tree)
    result = {
        "command": "python -m benchmarks.memory_jax " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "commit": commit,
        "budget_frac": BUDGET_FRAC,
        "max_steps": MAX_STEPS,
        "rows": rows,
        "targets": targets(rows),
    }
    md = (
        f"Command: `{result['command']}`; machine: {result['machine']['platform']}, "
        f"{result['machine']['cpu_count']} cores ({result['machine']['device']}), jax {result['machine']['jax']}; "
        f"{result['time_utc']} UTC; commit {result['commit']}.\n\n"
        "XLA compiled memory analysis of one jitted `update + apply_updates` step on "
        "ShapeDtypeStructs of Llama shapes (nothing allocated). Every case, baseline included, is "
        f"compiled in each argument order / donation layout ({common.LAYOUT_TEXT}) and reported in "
        "the one with the lowest peak (the others are listed). Peak = arguments + outputs + "
        "temporaries - donated; state = optimizer state; ratios are to optax.adamw's best peak. "
        f"Budget {BUDGET_FRAC:.1%} of the parameters, ID3 max_steps {MAX_STEPS}.\n\n"
        + markdown(rows)
        + "\n"
        + "".join(f"- {t}\n" for t in result["targets"])
    )
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "memory_jax.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.out, "memory_jax.md"), "w") as f:
            f.write(md)
    return result


if __name__ == "__main__":
    main()
