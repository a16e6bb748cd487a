"""CPU benchmark suite: ``python -m benchmarks [--quick] [--out bench_out] [--sizes ...]``.

For each model size, every case runs side by side in one process (steps interleaved round by
round, medians reported): step time and its ratio to a dense ``optax.adamw`` step, optimizer
state bytes, compiled peak memory of the step, init time, and summary bytes on disk. Writes
``results.json``, ``results.md`` and ``results.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_selective as osel
from benchmarks import common
from benchmarks.runs import run_info, run_line, write_json

DEFAULT_SIZES = "512x4,1024x5,2048x6"  # width x layers: about 1.05M, 5.2M, 25.2M params
QUICK_SIZES = "64x2,96x2,128x2"


def cases(budget: int, max_steps: int, lr: float = 1e-3, wd: float = 0.01) -> dict[str, Any]:
    adamw = lambda: optax.adamw(lr, weight_decay=wd)  # noqa: E731
    return {
        "optax.adamw (dense)": adamw(),
        "id3 wrapper adamw, compact": osel.selective_id3(budget, max_steps, inner=adamw()),
        "id3 wrapper adamw, dense state": osel.selective_id3(budget, max_steps, inner=adamw(), compact=False),
        "id3 wrapper adamw, compact, frozen": osel.selective_id3(budget, 1, inner=adamw()),
        "id3 chain + adam": optax.chain(osel.selective_id3(budget, max_steps), optax.adam(lr)),
        "pafi wrapper adamw, compact": osel.selective_pafi(budget, inner=adamw()),
        "bitfit wrapper adamw, compact": osel.selective_bitfit(budget, inner=adamw()),
    }


BASELINE = "optax.adamw (dense)"


def _fresh(step, grads):
    """``grads``, copied if ``step`` donates them (the same gradients feed every step)."""
    return jax.tree.map(jnp.copy, grads) if step.donates_grads else grads


def bench_size(width: int, layers: int, *, budget_frac: float, max_steps: int, repeats: int, init_repeats: int) -> dict:
    params = common.mlp_params(width, layers)
    grads = common.fake_grads(params)
    n = common.count_params(params)
    budget = max(1, int(n * budget_frac))
    txs = cases(budget, max_steps)
    rows: dict[str, dict] = {}
    runs = {}
    for name, tx in txs.items():
        p = jax.tree.map(jnp.copy, params)
        state = common.block(tx.init(p))  # compiles the eager ops once
        layout, tried = common.best_layout(tx, grads, state, p)  # each case in its best layout
        step = common.make_step(tx, layout)
        mem = min((t["peak_bytes"] for t in tried if t["layout"] == layout), default=None)
        for _ in range(2):  # warm-up (and, for "frozen", spend the one selection step)
            p, state = common.block(step(_fresh(step, grads), state, p))
        runs[name] = [step, state, p, [], []]
        rows[name] = {
            "state_bytes": common.tree_bytes(state),
            "step_peak_bytes": mem,
            "layout": layout,
            "peak_by_layout": {t["layout"]: t["peak_bytes"] for t in tried},
        }
    for i in range(repeats):  # round robin, so load changes hit every case alike
        for name, run in runs.items():
            step, state, p, times, init_times = run
            g = common.block(_fresh(step, grads))
            t0 = time.perf_counter()
            p, state = common.block(step(g, state, p))
            times.append(time.perf_counter() - t0)
            run[1], run[2] = state, p
            if i < init_repeats:  # init timed in the same rounds as the steps
                t0 = time.perf_counter()
                common.block(txs[name].init(p))
                init_times.append(time.perf_counter() - t0)
    base = common.median_ms(runs[BASELINE][3])
    for name, (_, state, p, times, init_times) in runs.items():
        r = rows[name]
        r["step_ms"] = common.median_ms(times)
        r["init_ms"] = common.median_ms(init_times)
        r["step_ratio"] = r["step_ms"] / base
        r["init_over_dense_step"] = r["init_ms"] / base
        if name != BASELINE and "chain" not in name:
            r["summary_bytes"] = common.summary_bytes(p, state)
            r["budget_used"] = osel.budget_used(state)
    del runs
    return {"width": width, "layers": layers, "params": n, "budget": budget, "max_steps": max_steps, "rows": rows}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "optax": optax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['processor']}, {m['cpu_count']} cores ({m['device']}), jax {m['jax']}, optax {m['optax']}; "
        f"{m['time_utc']} UTC; 1-min load average at start {m.get('loadavg_1min_at_start')} "
        "(the cores are shared, so absolute times are noisy; ratios are measured side by side). "
        f"Command: `{results['command']}`.",
        "",
        run_line(results.get("run") or run_info()),
        "",
        "Step = jit(update + apply_updates), each case compiled in every argument order / donation "
        f"layout ({common.LAYOUT_TEXT}) and run in the one with the lowest compiled peak; median of "
        f"{results['repeats']} interleaved steps. Ratio = step / dense optax.adamw step in the same run. "
        "Peak = XLA compiled memory of one step (arguments + outputs + temporaries - donated). "
        "Init = eager `tx.init(params)`, median. Summary = orbax folder size on disk. "
        + ("glibc's mmap threshold fixed (`benchmarks.common.steady_malloc`), so large "
           "temporaries do not page-fault anew each step." if results.get("steady_malloc") else
           "Allocator left at its defaults."),
        "",
    ]
    for size in results["sizes"]:
        n, b = size["params"], size["budget"]
        lines += [
            f"### {n / 1e6:.2f}M params ({size['layers']} x Linear({size['width']}, {size['width']})), "
            f"budget {b} ({100 * b / n:.2g}%), max_steps {size['max_steps']}",
            "",
            "| case | layout | step ms | ratio | state | N + 16 B | peak (step) | init ms | init / step | summary |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in size["rows"].items():
            lines.append(
                f"| {name} | {r.get('layout', 'gsp/sp')} | {r['step_ms']:.2f} | {r['step_ratio']:.2f}x | {fmt_bytes(r['state_bytes'])} | "
                f"{fmt_bytes(n + 16 * b)} | {fmt_bytes(r['step_peak_bytes'])} | {r['init_ms']:.1f} | "
                f"{r['init_over_dense_step']:.2f} | {fmt_bytes(r.get('summary_bytes'))} |"
            )
        lines.append("")
    for t in results.get("targets", []):
        lines.append(f"- {t}")
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[str]:
    big = max(results["sizes"], key=lambda s: s["params"])
    n, b, rows = big["params"], big["budget"], big["rows"]
    id3, pafi = rows["id3 wrapper adamw, compact"], rows["pafi wrapper adamw, compact"]
    out = [
        f"ID3 wrapper (compact) step at {n / 1e6:.1f}M: {id3['step_ratio']:.2f}x dense adamw "
        f"(target <= 1.0x): {'met' if id3['step_ratio'] <= 1.0 else 'NOT met'}",
        f"PaFI init at {n / 1e6:.1f}M: {pafi['init_over_dense_step']:.2f}x a dense step "
        f"(target <= 3x): {'met' if pafi['init_over_dense_step'] <= 3.0 else 'NOT met'}",
    ]
    for name in ("id3 wrapper adamw, compact", "pafi wrapper adamw, compact"):
        s = rows[name]["state_bytes"]
        out.append(
            f"{name} state {s} B vs N + 16 x budget = {n + 16 * b} B: {'met' if s <= n + 16 * b else 'NOT met'}"
        )
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    ns = [s["params"] for s in sizes]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in sizes[0]["rows"]:
        a.plot(ns, [s["rows"][name]["step_ratio"] for s in sizes], marker="o", label=name)
        b.plot(ns, [s["rows"][name]["state_bytes"] for s in sizes], marker="o", label=name)
    b.plot(ns, [s["params"] + 16 * s["budget"] for s in sizes], "k--", label="N + 16 x budget")
    a.axhline(1.0, color="gray", lw=0.8)
    a.set(xscale="log", xlabel="parameters", ylabel="step time / dense optax.adamw step", title="Step time ratio")
    b.set(xscale="log", yscale="log", xlabel="parameters", ylabel="bytes", title="Optimizer state")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out", help="output folder (default bench_out/)")
    ap.add_argument("--sizes", default=None, help=f"comma list of WIDTHxLAYERS (default {DEFAULT_SIZES})")
    ap.add_argument("--budget-frac", type=float, default=0.01, help="budget as a fraction of params")
    ap.add_argument("--max-steps", type=int, default=100, help="ID3 max_steps (timed steps stay below it)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 9, quick 2)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test")
    ap.add_argument("--torch", choices=["auto", "off"], default="auto", help="torch rows if the bridge is installed")
    ap.add_argument("--memory", choices=["auto", "off"], default="auto",
                    help="with the torch rows: peak memory of a bf16 Llama step (benchmarks.memory; "
                         "200M, quick: tiny), full AdamW / LoRA / ID3 compact / ID3 streaming")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads for the torch rows (default: torch's; 1 on a busy machine)")
    ap.add_argument("--memory-presets", default=None,
                    help="Llama shapes for the compiled-memory rows (default 200m,7b; quick: tiny; '' skips)")
    args = ap.parse_args(argv)
    if args.memory_presets is None:
        args.memory_presets = "tiny" if args.quick else "200m,7b"
    steady = common.steady_malloc()
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = args.repeats or (2 if args.quick else 9)
    results: dict = {
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "steady_malloc": steady,
        "repeats": repeats,
        "budget_frac": args.budget_frac,
        "sizes": [],
    }
    for spec in sizes.split(","):
        width, layers = (int(v) for v in spec.lower().split("x"))
        print(f"[bench] {width}x{layers} ...", flush=True)
        results["sizes"].append(
            bench_size(width, layers, budget_frac=args.budget_frac, max_steps=args.max_steps,
                       repeats=repeats, init_repeats=1 if args.quick else 5)
        )
    results["targets"] = targets(results)
    if args.memory_presets:  # XLA's compiled memory of one step at Llama shapes (bf16)
        from benchmarks import memory_jax

        rows = [r for preset in args.memory_presets.split(",") for r in memory_jax.jax_rows(preset)]
        results["memory_jax"] = rows
        results["targets"] += memory_jax.targets(rows)
    if args.torch == "auto":
        try:
            from benchmarks import torch_rows
        except ImportError:
            torch_rows = None
        if torch_rows is not None:
            results["torch"] = torch_rows.run(sizes, quick=args.quick, repeats=repeats,
                                              threads=args.torch_threads)
            if args.memory == "auto":
                from benchmarks import memory

                results["memory"] = memory.run(
                    ["tiny" if args.quick else "200m"], ["adamw", "lora", "id3_compact", "id3_stream",
                                                        "id3_stream_rows"],
                    steps=2, jax_rows=False)
    results = write_json(os.path.join(args.out, "results.json"), results)
    md = markdown(results)
    if "torch" in results:
        from benchmarks import torch_rows

        md += "\n" + torch_rows.markdown(results["torch"])
    if "memory_jax" in results:
        from benchmarks import memory_jax

        md += "\n### JAX: compiled memory of one step at Llama shapes (bf16)\n\n" + memory_jax.markdown(results["memory_jax"])
    if "memory" in results:
        from benchmarks import memory

        md += "\n" + memory.markdown(results["memory"])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    plot(results, os.path.join(args.out, "results.png"))
    print(md)
    print(f"[bench] wrote {args.out}/results.json, results.md, results.png")
    return results
