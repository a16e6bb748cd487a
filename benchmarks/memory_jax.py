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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_selective as osel

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


def count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def cases(budget: int, max_steps: int = MAX_STEPS, lr: float = 1e-4, wd: float = 0.01) -> dict:
    adamw = lambda: optax.adamw(lr, weight_decay=wd)  # noqa: E731
    return {
        BASELINE: adamw(),
        "id3 compact": osel.selective_id3(budget, max_steps, inner=adamw()),
        "pafi compact": osel.selective_pafi(budget, inner=adamw()),
    }


def _step(tx):
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(1, 2))


def analyse(tx, params) -> dict:
    """Compiled memory of one donated step of ``tx`` on ``params`` (ShapeDtypeStructs)."""
    state = jax.eval_shape(tx.init, params)
    compiled = _step(tx).lower(params, state, params).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    xla_peak = getattr(m, "peak_memory_in_bytes", None)
    return {
        "peak_bytes": int(peak),
        "temp_bytes": int(m.temp_size_in_bytes),
        "xla_peak_bytes": None if xla_peak is None else int(xla_peak),
        "state_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))),
        "step_s": None,
    }


def jax_rows(preset: str, dtype: Any = jnp.bfloat16) -> list[dict]:
    """Compiled-memory rows for ``preset`` ("200m", "7b", ...): adamw, ID3 and PaFI compact.

    Each row: ``case``, ``peak_bytes``, ``temp_bytes``, ``state_bytes``, ``step_s`` (None:
    compiled, not run), ``params``, ``budget``, ``ratio`` (peak / optax.adamw's peak).
    """
    params = llama_shapes(preset, dtype)
    n = count(params)
    budget = max(1, int(n * BUDGET_FRAC))
    rows = []
    for name, tx in cases(budget).items():
        row = {"case": name, "preset": preset, "dtype": jnp.dtype(dtype).name, "params": n, "budget": budget}
        row.update(analyse(tx, params))
        rows.append(row)
    base = rows[0]["peak_bytes"]
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
                f"{r['case']} at {r['preset']} ({r['dtype']}): {r['ratio']:.2f}x optax.adamw's peak "
                f"(target <= {t}x): {'met' if r['ratio'] <= t else 'NOT met'}"
            )
    return out


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| preset | params | case | peak MiB | temp MiB | state MiB | peak / adamw | XLA peak MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} {r['dtype']} | {r['params'] / 1e6:,.1f}M | {r['case']} | {_mib(r['peak_bytes'])} | "
            f"{_mib(r['temp_bytes'])} | {_mib(r['state_bytes'])} | {r['ratio']:.2f}x | {_mib(r.get('xla_peak_bytes'))} |"
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_jax", description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="200m,7b", help="comma list of " + ", ".join(PRESETS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None, help="folder for memory_jax.json / memory_jax.md")
    args = ap.parse_args(argv)
    commit = _commit()  # the code that runs: read before the (long) compiles
    rows = []
    for preset in args.presets.split(","):
        print(f"[memory_jax] {preset} ...", flush=True)
        rows += jax_rows(preset, jnp.dtype(args.dtype))
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
        "XLA compiled memory analysis of one jitted `update + apply_updates` step, params and "
        "state donated, on ShapeDtypeStructs of Llama shapes (nothing allocated). Peak = "
        "arguments + outputs + temporaries - donated; state = optimizer state. Budget "
        f"{BUDGET_FRAC:.1%} of the parameters, ID3 max_steps {MAX_STEPS}.\n\n"
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
