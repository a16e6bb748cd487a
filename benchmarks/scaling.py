"""Per-step time of a sharded ID3 step on 1, 2, 4 and 8 simulated CPU devices.

Each device count runs in its own interpreter (the count is fixed when jax is imported) with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. The parameters (four leaves, sharded
over a 1-D "model" mesh) and the gradients are fixed; one step is ``tx.update`` of
``selective_id3(..., inner=optax.adam)`` plus ``optax.apply_updates``, jitted, with the
mask still growing (step < max_steps). Reported: median and min wall time per step after a
warm-up, and the largest array a collective moves in the compiled step (a leaf-sized number
means the selection gathers scores).

Simulated devices share this machine's cores, so the table shows partitioning overhead, not
the speed-up of real devices.

    python benchmarks/scaling.py [--entries 1048576] [--steps 20] [--out bench_out/scaling.json]
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

DEVICE_COUNTS = (1, 2, 4, 8)
ROOT = Path(__file__).resolve().parents[1]


def measure(entries: int, steps: int) -> dict:
    """Runs in a worker interpreter whose device count is already fixed."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_selective as osel

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
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
    tx = osel.selective_id3(budget, max_steps=10 * steps, inner=optax.adam(1e-3))
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


def run_all(entries: int, steps: int) -> list[dict]:
    rows = []
    for n in DEVICE_COUNTS:
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--entries",
            str(entries),
            "--steps",
            str(steps),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{n} devices failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"ID3 step (adam inner), {rows[0]['entries']:,} entries, budget {rows[0]['budget']:,}, "
        f"jax {rows[0]['jax']}, simulated CPU devices"
    )
    print(
        f"{'devices':>7} {'median ms':>10} {'min ms':>8} {'vs 1 dev':>8} {'largest collective':>19}"
    )
    base = rows[0]["median_ms"]
    for r in rows:
        print(
            f"{r['devices']:>7} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} "
            f"{r['median_ms'] / base:>7.2f}x {r['largest_collective']:>19,}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2**20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "scaling.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.entries, args.steps)))
        return
    rows = run_all(args.entries, args.steps)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "scaling", "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
