"""ID3's per-step selection on its own: the row-maxima pass grouped vs a plain reduction.

``selection.topk._row_maxima`` scores each row in column groups combined elementwise, so XLA
fuses the scoring into the one pass that reads gradient, parameter and mask. This script
times the whole per-step selection (``selection.top_k_indices`` with ID3's score, as the
compact wrapper and the torch bridge call it) both ways, interleaved round by round in one
process, checks that both pick the same entries, and prints a Markdown table::

    python -m benchmarks.selection_pass                       # 1M, 5M and 25M entries
    python -m benchmarks.selection_pass --sizes 2048x6 --rounds 30
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import fake_grads, median_ms, mlp_params
from optax_selective import selection
from optax_selective.methods import ID3
from optax_selective.selection import topk


def selection_fn(method: ID3, k: int, groups: int):
    """A jitted ID3 selection step, traced with ``groups`` column groups per row."""

    def select(grads, params, masks):
        inputs = [(g, p, m) for g, p, m in zip(grads, params, masks)]
        return selection.top_k_indices(inputs, k, k, score_fn=method.score)

    def traced(*args):
        saved = topk._ROW_GROUPS
        topk._ROW_GROUPS = groups  # read at trace time only
        try:
            return select(*args)
        finally:
            topk._ROW_GROUPS = saved

    return jax.jit(traced)


def measure(width: int, layers: int, rounds: int, budget_frac: float, max_steps: int) -> dict:
    params = jax.tree.leaves(mlp_params(width, layers))
    grads = jax.tree.leaves(fake_grads(params))
    n = sum(int(p.size) for p in params)
    budget = max(1, int(budget_frac * n))
    method = ID3(budget=budget, max_steps=max_steps, eps=1e-3)
    k = method.k_max
    # half of the budget already selected, as in the middle of ID3's selection phase
    rng = np.random.default_rng(0)
    masks = [jnp.asarray(rng.random(p.shape) < budget_frac / 2) for p in params]
    fns = {"plain": selection_fn(method, k, 1), "grouped": selection_fn(method, k, topk._ROW_GROUPS)}
    out = {name: jax.block_until_ready(f(grads, params, masks)) for name, f in fns.items()}
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out["plain"], out["grouped"]))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(grads, params, masks))
            times[name].append(time.perf_counter() - t0)
    plain, grouped = median_ms(times["plain"]), median_ms(times["grouped"])
    return {"size": f"{width}x{layers}", "entries": n, "k": k, "plain_ms": plain,
            "grouped_ms": grouped, "ratio": grouped / plain, "same_entries": same,
            "grouped_ns_per_entry": grouped * 1e6 / n}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512x4,1024x5,2048x6", help="comma list of WIDTHxLAYERS")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--budget-frac", type=float, default=0.01)
    p.add_argument("--max-steps", type=int, default=100)
    args = p.parse_args(argv)
    rows = []
    print(f"# ID3 selection step, plain vs grouped row maxima ({jax.devices()[0].device_kind}, "
          f"{args.rounds} interleaved rounds, medians)\n")
    print("| entries | k per step | plain | grouped | grouped / plain | grouped ns/entry | same entries |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for size in args.sizes.split(","):
        width, layers = (int(x) for x in size.split("x"))
        r = measure(width, layers, args.rounds, args.budget_frac, args.max_steps)
        rows.append(r)
        print(f"| {r['entries']:,} | {r['k']:,} | {r['plain_ms']:.1f} ms | {r['grouped_ms']:.1f} ms | "
              f"{r['ratio']:.2f}x | {r['grouped_ns_per_entry']:.2f} | {r['same_entries']} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
