"""Makes this fixture on a CUDA machine: python make_fixture.py OUT_DIR.

Trains a tiny model with ID3 (wrapper form) for 3 steps on the GPU, checks that the summary
made from GPU arrays (compiled gather path) matches a NumPy reference and that applying it on
the GPU works, then writes OUT_DIR/summary (save_summary), OUT_DIR/state (orbax
StandardCheckpointer: params and optimizer state, with cuda:0 shardings) and
OUT_DIR/expected.npz. tests/test_summary.py and tests/test_transform.py restore them on CPU.
Made with jax 0.11.2, orbax-checkpoint 0.12.4 on an NVIDIA H100.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_selective as osel
from optax_selective.summary import make as sm


def fixture_params_and_tx():
    """The initial params and the transformation the fixture was made with.

    The tests that restore the fixture on CPU build their targets from this too. The inner
    state is dense (compact=False), as it was when the fixture was written.
    """
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w": jax.random.normal(k1, (64, 32)),
        "b": jnp.zeros(32, jnp.bfloat16),
        "h": jax.random.normal(k2, (32, 5)),
    }
    tx = osel.selective_id3(
        budget=50, max_steps=4, inner=optax.adamw(0.05, weight_decay=0.1), compact=False
    )
    return params, tx


def main(work: str) -> None:
    print(
        "devices",
        jax.devices(),
        "jax",
        jax.__version__,
        "orbax",
        ocp.__version__ if hasattr(ocp, "__version__") else "?",
    )
    assert jax.devices()[0].platform == "gpu"
    params, tx = fixture_params_and_tx()
    x = jax.random.normal(jax.random.key(2), (16, 64))

    def loss(p):
        return jnp.mean(((x @ p["w"] + p["b"].astype(jnp.float32)) @ p["h"]) ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(3):
        p, s = step(p, s)
    assert not sm._in_host_memory(p["w"]), p["w"].devices()
    summ = osel.make_summary(p, s)
    mask = osel.selected_mask(s)
    for leaf in summ.leaves:
        key = leaf.key.strip("[]'")
        want = np.flatnonzero(np.asarray(mask[key]))
        assert np.array_equal(leaf.indices, want), key
        assert np.array_equal(leaf.values, np.asarray(p[key]).reshape(-1)[want]), key
    print("device-path summary ok:", summ)
    applied = osel.apply_summary(params, summ)
    for k in params:
        assert np.array_equal(np.asarray(applied[k]), np.asarray(p[k])), k
        assert applied[k].devices() == p[k].devices()
    print("device-path apply ok")
    os.makedirs(work, exist_ok=True)
    osel.save_summary(f"{work}/summary", summ)
    with ocp.StandardCheckpointer() as ck:
        ck.save(f"{work}/state", {"params": p, "opt_state": s})
    np.savez(
        f"{work}/expected.npz",
        **{f"p_{k}": np.asarray(v).astype(np.float32) for k, v in p.items()},
        **{f"m_{k}": np.asarray(v) for k, v in mask.items()},
        count=np.asarray(osel.find_selective_state(s).count),
    )
    print("saved")


if __name__ == "__main__":
    main(sys.argv[1])
