"""Per-step time of a sharded ID3 step on 1, 2, 4 and 8 simulated CPU devices.

Each device count runs in its own interpreter (the count is fixed when jax is imported) with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. The parameters (four leaves, sharded
over a 1-D "model" mesh, in auto and in explicit sharding mode) and the gradients are fixed;
one step is ``tx.update`` of ``selective_id3(..., inner=optax.adam, compact=False)`` plus
``optax.apply_updates``, jitted, with the mask still growing (step < max_steps). Reported: median and min wall time per step after a
warm-up, and the largest array a collective moves in the compiled step (a leaf-sized number
means the selection gathers scores).

Simulated devices share this machine's cores, so the table shows partitioning overhead, not
the speed-up of real devices.

    python -m benchmarks.scaling [--entries 1048576] [--steps 20] [--modes auto,explicit]
                                  [--out bench_out/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runs import ROOT, write_json

DEVICE_COUNTS = (1, 2, 4, 8)


def measure(entries: int, steps: int, mode: str) -> dict:
    """Runs in a worker interpreter whose device count is already fixed."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_selective as osel

    n = jax.device_count()
    axis_type = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}
    mesh = jax.make_mesh((n,), ("model",), axis_types=(axis_type[mode],))
    jax.set_mesh(mesh)
    width = entries // (4 * 64)  # four (64, width) leaves
    width -= width % 8
    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P(None, "model"))
    params = {
        f"w{i}": jax.device_put(rng.normal(size=(64, width)).astype(np.float32), sharding)
        for i in range(4)
    }
    grads = {
        k: jax.device_put(rng.normal(size=v.shape).astype(np.float32), sharding)
        for k, v in params.items()
    }
    budget = max(steps, entries // 100)
    # Compact inner state refuses explicitly sharded params for now: dense in both modes.
    tx = osel.selective_id3(budget, max_steps=10 * steps, inner=optax.adam(1e-3), compact=False)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    hlo = step.lower(params, state, grads).compile().as_text()
    for _ in range(3):  # compile and warm up
        params, state = step(params, state, grads)
    jax.block_until_ready(params)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state = step(params, state, grads)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "devices": n,
        "entries": 4 * 64 * width,
        "budget": budget,
        "steps_timed": steps,
        "median_ms": 1e3 * float(np.median(times)),
        "min_ms": 1e3 * float(np.min(times)),
        "largest_collective": _largest_collective(hlo),
        "jax": jax.__version__,
    }


def _largest_collective(hlo: str) -> int:
    largest = 0
    op = re.compile(r"=\s*(.*?)\s(all-gather|all-to-all|collective-permute|all-reduce)(-start)?\(")
    for line in hlo.splitlines():
        m = op.search(line)
        if m:
            for dims in re.findall(r"\[([\d,]*)\]", m.group(1)):
                size = 1
                for d in filter(None, dims.split(",")):
                    size *= int(d)
                largest = max(largest, size)
    return largest


def run_all(entries: int, steps: int, modes: list[str]) -> list[dict]:
    rows = []
    for mode, n in [(m, n) for m in modes for n in DEVICE_COUNTS]:
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", "--entries", str(entries)]
        cmd += ["--steps", str(steps), "--modes", mode]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} mode, {n} devices failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def print_table(rows: list[dict]) -> None:
    r0 = rows[0]
    print(
        f"ID3 step (dense Adam inner), {r0['entries']:,} entries, budget {r0['budget']:,}, "
        f"jax {r0['jax']}, simulated CPU devices"
    )
    print(
        f"{'mode':>8} {'devices':>7} {'median ms':>10} {'min ms':>8} {'vs 1 dev':>8} "
        f"{'largest collective':>19}"
    )
    base = {}
    for r in rows:
        b = base.setdefault(r["mode"], r["median_ms"])
        print(
            f"{r['mode']:>8} {r['devices']:>7} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} "
            f"{r['median_ms'] / b:>7.2f}x {r['largest_collective']:>19,}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2**20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "scaling.json")
    parser.add_argument("--modes", default="auto,explicit", help="sharding modes, comma-separated")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.entries, args.steps, args.modes)))
        return
    rows = run_all(args.entries, args.steps, args.modes.split(","))
    print_table(rows)
    write_json(args.out, {"benchmark": "scaling", "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
