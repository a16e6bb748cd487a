"""Sharded params, step jitted WITHOUT ``jax.set_mesh`` (auto mode); run by
tests/test_sharding_no_mesh.py with 8 simulated CPU devices (or as a script: one JSON line per form):
the largest collective in the compiled step, whether every output kept its input's sharding,
and whether the results equal the single-device run."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_selective as osel
from tests._dist_workers import common

FORMS = {
    "id3_compact": lambda: osel.selective_id3(common.BUDGET, common.MAX_STEPS, inner=optax.adam(0.1)),
    "id3_dense": lambda: osel.selective_id3(
        common.BUDGET, common.MAX_STEPS, inner=optax.adam(0.1), compact=False
    ),
    "id3_chain": lambda: optax.chain(osel.selective_id3(common.BUDGET, common.MAX_STEPS), optax.sgd(0.1)),
}


def _spec(x):
    return getattr(x.sharding, "spec", type(x.sharding).__name__)


def run(name: str, mesh) -> dict:
    params, targets = common.make_params()
    # plus a replicated bias as large as a sharded leaf: it must stay replicated
    params["rb"] = np.linspace(-1.0, 1.0, common.WIDTH, dtype=np.float32)
    targets["rb"] = np.ones(common.WIDTH, np.float32)
    specs = dict(common.specs(), rb=P())
    placed = {k: NamedSharding(mesh, s) for k, s in specs.items()} if mesh else None
    put = (lambda t: {k: jax.device_put(v, placed[k]) for k, v in t.items()}) if mesh else (
        lambda t: jax.device_put(t, jax.devices()[0])
    )
    params, targets = put(params), put(targets)
    tx = FORMS[name]()
    state = tx.init(params)
    step = jax.jit(common.make_step(tx))
    compiled = step.lower(params, state, targets).compile()
    found = common.collectives(compiled.as_text())
    kept = []
    for _ in range(common.STEPS):
        new_params, new_state = step(params, state, targets)
        for before, after in ((params, new_params), (state, new_state)):
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
                if mesh and not b.sharding.is_equivalent_to(a.sharding, b.ndim):
                    kept.append(f"{jax.tree_util.keystr(path)}: {_spec(a)} -> {_spec(b)}")
        params, state = new_params, new_state
    return {
        "largest_collective": max((n for _, n in found), default=0),
        "collectives": sorted(set(found))[-6:],
        "sharding_changed": sorted(set(kept))[:8],
        "params": {k: np.asarray(v).tobytes().hex()[:64] + str(np.asarray(v).sum()) for k, v in params.items()},
        "mask": {k: np.flatnonzero(np.asarray(m)).tolist() for k, m in osel.selected_mask(state).items()},
    }


def rows(names=None) -> list[dict]:
    """One row per form: the sharded run (8 devices) against the single-device run."""
    assert jax.device_count() == 8, jax.device_count()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    out = []
    for name in names or FORMS:
        sharded, single = run(name, mesh), run(name, None)
        out.append({
            "form": name,
            "largest_collective": sharded["largest_collective"],
            "collectives": sharded["collectives"],
            "sharding_changed": sharded["sharding_changed"],
            "same_as_single_device": sharded["params"] == single["params"] and sharded["mask"] == single["mask"],
        })
    return out


if __name__ == "__main__":
    for row in rows(sys.argv[1:]):
        print(json.dumps(row), flush=True)
