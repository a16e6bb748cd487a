"""GPU benchmark, one command, under 5 minutes on one H100 (1B parameters by default):

    python -m benchmarks.gpu [--out bench_out/gpu] [--budget-seconds 280]

Model: 15 x Linear(8192, 8192) in float32 (1.007B parameters, as in issue 4). Every case runs
in its own subprocess (a clean device, its own peak-memory counter, its own timeout), in this
order, until the time budget is spent: dense optax.adamw, JAX ID3 (compact wrapper around
adamw), JAX PaFI (init and step), torch fused AdamW, torch foreach AdamW, torch bridge ID3
with compact and with dense inner state (if importable), and the reference selective-optimizers==0.4 ID3 (if pip can install it;
the device machine may be offline, then it is reported as skipped). Prints a table and
writes results.json. Step = one optimizer update incl. applying it, median of timed steps; each
JAX case runs in the argument order / donation layout with its lowest compiled peak
(``benchmarks.common.best_layout``), torch ratios are to the faster of fused and foreach AdamW.
Peak = device peak bytes in use (JAX memory_stats / torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import runs

CASES = ["jax_adamw", "jax_id3", "jax_pafi", "torch_fused", "torch_foreach", "bridge_id3", "bridge_id3_dense",
         "reference_id3"]


def _jax_case(name, width, layers, budget_frac, max_steps, steps):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import optax_selective as osel

    @jax.jit
    def make(key):
        ps, gs = {}, {}
        for i in range(layers):
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            ps[f"l{i:02d}"] = {"kernel": jax.random.normal(k1, (width, width)) / np.sqrt(width), "bias": jnp.zeros(width)}
            gs[f"l{i:02d}"] = {"kernel": jax.random.normal(k2, (width, width)) * 1e-2, "bias": jnp.full(width, 1e-3)}
        return ps, gs

    params, grads = jax.block_until_ready(make(jax.random.key(0)))
    n = sum(x.size for x in jax.tree.leaves(params))
    budget = int(n * budget_frac)
    adamw = optax.adamw(1e-4, weight_decay=0.01)
    tx = {
        "jax_adamw": adamw,
        "jax_id3": osel.selective_id3(budget, max_steps, inner=adamw),
        "jax_pafi": osel.selective_pafi(budget, inner=adamw),
    }[name]
    init = jax.jit(tx.init) if name != "jax_pafi" else tx.init
    t0 = time.perf_counter()
    state = jax.block_until_ready(init(params))
    init_first_s = time.perf_counter() - t0
    init_s = None
    if name == "jax_pafi":  # second call: no compilation
        del state
        t0 = time.perf_counter()
        state = jax.block_until_ready(tx.init(params))
        init_s = time.perf_counter() - t0

    from benchmarks import common

    # every case in the argument order / donation layout with its lowest compiled peak
    layout, _ = common.best_layout(tx, grads, state, params)
    step = common.make_step(tx, layout)
    fresh = (lambda g: jax.tree.map(jnp.copy, g)) if step.donates_grads else (lambda g: g)  # noqa: E731
    for _ in range(2):
        params, state = jax.block_until_ready(step(fresh(grads), state, params))
    times = []
    for _ in range(steps):
        g = jax.block_until_ready(fresh(grads))
        t0 = time.perf_counter()
        params, state = jax.block_until_ready(step(g, state, params))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "params": int(n),
        "budget": budget,
        "step_ms": float(np.median(times) * 1e3),
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state))),
        "init_s": init_s if init_s is not None else init_first_s,
        "device": str(jax.devices()[0].device_kind),
        "layout": layout,
    }


def _torch_case(name, width, layers, budget_frac, max_steps, steps, ref_dir=None):
    import numpy as np
    import torch

    dev = "cuda"
    torch.manual_seed(0)
    with torch.device(dev):
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    budget = int(n * budget_frac)
    if name == "torch_fused":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    elif name == "torch_foreach":
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    elif name in ("bridge_id3", "bridge_id3_dense"):
        from torch_bridge import get_selective_optimizer

        opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
            params, lr=1e-4, budget=budget, max_steps=max_steps, fused=True, compact=name == "bridge_id3")
    else:
        import selective_optimizers.wrap as wrap

        assert wrap.__file__.startswith(ref_dir), wrap.__file__
        opt = wrap.get_selective_optimizer(torch.optim.AdamW, "id3")(params, lr=1e-4, budget=budget, max_steps=max_steps, verify=False)
    for _ in range(2):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "params": int(n),
        "budget": budget,
        "step_ms": float(np.median(times) * 1e3),
        "peak_bytes": int(torch.cuda.max_memory_allocated()),
        "device": torch.cuda.get_device_name(),
    }


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--budget-frac", type=float, default=0.01)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--budget-seconds", type=float, default=280.0, help="total wall-clock budget")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="bench_out/gpu")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--ref-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    args = (a.width, a.layers, a.budget_frac, a.max_steps, a.steps)
    if a.case:  # worker
        fn = _jax_case if a.case.startswith("jax") else _torch_case
        res = fn(a.case, *args, **({"ref_dir": a.ref_dir} if a.case == "reference_id3" else {}))
        print("RESULT " + json.dumps(res), flush=True)
        return
    start = time.time()
    results = {}
    for case in a.cases.split(","):
        left = a.budget_seconds - (time.time() - start)
        if left < 20:
            results[case] = {"skipped": "time budget spent"}
            continue
        extra, where = [], {"cwd": str(runs.ROOT)}
        if case == "reference_id3":
            try:
                ref_dir = str(runs.install_reference(timeout=min(60, left - 15)))
            except runs.ReferenceUnavailable as e:
                results[case] = {"skipped": str(e)}
                continue
            # Started in ref_dir: the reference's selective_optimizers comes first on sys.path.
            extra, where = ["--ref-dir", ref_dir], runs.reference_process(ref_dir)
        cmd = [sys.executable, "-m", "benchmarks.gpu", "--case", case, "--width", str(a.width),
               "--layers", str(a.layers), "--budget-frac", str(a.budget_frac),
               "--max-steps", str(a.max_steps), "--steps", str(a.steps), *extra]
        print(f"[gpu] {case} ...", flush=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, left - 5), **where)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            results[case] = json.loads(lines[-1][7:]) if lines else {"error": (tail[-1] if tail else f"exit {r.returncode}")[-300:]}
        except subprocess.TimeoutExpired:
            results[case] = {"error": "timed out"}
        print(f"[gpu] {case}: {results[case]}", flush=True)
    base_jax = results.get("jax_adamw", {}).get("step_ms")
    # the torch baseline at its best: the faster of fused and foreach AdamW
    base_torch = min((results.get(c, {}).get("step_ms") or float("inf") for c in ("torch_fused", "torch_foreach")),
                     default=None)
    base_torch = None if base_torch == float("inf") else base_torch
    ref_peak = results.get("reference_id3", {}).get("peak_bytes")
    print("\n| case | device | step ms | / optax.adamw | / best torch AdamW (fused, foreach) | peak GB | / reference peak | state GB | init s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for case, r in results.items():
        if "step_ms" not in r:
            print(f"| {case} | {r.get('skipped') or r.get('error')} ||||||||")
            continue
        f = lambda x, d=2, u="": "n/a" if x is None else f"{x:.{d}f}{u}"  # noqa: E731
        pk = r.get("peak_bytes")
        print(
            f"| {case} | {r.get('device')} | {r['step_ms']:.2f} | {f(r['step_ms'] / base_jax if base_jax else None, u='x')} | "
            f"{f(r['step_ms'] / base_torch if base_torch else None, u='x')} | {f(pk / 1e9 if pk else None)} | "
            f"{f(pk / ref_peak if pk and ref_peak else None)} | {f(r['state_bytes'] / 1e9 if 'state_bytes' in r else None)} | "
            f"{f(r.get('init_s'))} |"
        )
    runs.write_json(os.path.join(a.out, "results.json"), {"args": vars(a), "results": results})
    print(f"\n[gpu] total {time.time() - start:.0f}s; wrote {a.out}/results.json")


if __name__ == "__main__":
    main()
