"""Problem set-up shared by the sharded and multi-process checks (no device set-up here).

The loss is elementwise, so its gradient is exact whatever the sharding: any difference
between a sharded and a single-device run comes from the selection, not from a reduction
order. Parameters and targets take few distinct values, so scores tie a lot (many are exactly
0) and the tie rule (lower global index first) decides which entries are chosen.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import optax_selective as osel

WIDTH = 2048  # every sharded leaf holds >= WIDTH entries (the no-gather check relies on it)
BUDGET = 300
MAX_STEPS = 4
NUM_ENTRIES = 2 * 8 * WIDTH + WIDTH + 16
STEPS = MAX_STEPS + 1  # one step past max_steps: the mask must stay frozen


def make_params(seed: int = 0) -> dict:
    """Host (numpy) parameters and the loss targets, in a fixed leaf order."""
    rng = np.random.default_rng(seed)
    values = np.array([0.5, 1.0, 2.0, -1.0], np.float32)
    shapes = {"b1": (WIDTH,), "scale": (16,), "w1": (8, WIDTH), "w2": (WIDTH, 8)}
    params = {k: rng.choice(values, size=s) for k, s in shapes.items()}
    targets = {}
    for k, p in params.items():
        pick = rng.integers(0, 3, size=p.shape)  # 0: gradient p; 1: gradient 0; 2: p + 1
        targets[k] = np.select([pick == 0, pick == 1], [np.zeros_like(p), -p], np.ones_like(p))
    return params, targets


def specs(axes: tuple[str, str] = ("data", "model")) -> dict:
    """How each leaf is sharded over a 2-D mesh (``scale`` is replicated)."""
    a, b = axes
    return {"b1": P(b), "scale": P(), "w1": P(a, b), "w2": P(b, a)}


def loss(params: dict, targets: dict) -> jax.Array:
    """``sum(p**2 / 2 + t * p)`` over the leaves: gradient ``p + t``, elementwise."""
    total = jnp.zeros([], jnp.float32)
    for k, p in params.items():
        total = total + jnp.sum(0.5 * p * p + targets[k] * p)
    return total


def optimizers(compact: bool = True) -> dict:
    """The transformations the checks run, by name.

    ``compact`` is passed to the wrapper forms (compact inner state, the default, keeps the
    inner optimizer's state for the selected entries only); ``id3_wrapper_adam_dense`` is
    always dense, so its Adam moments are shaped, and sharded, like the params.
    """
    return {
        "id3_wrapper_adam": osel.selective_id3(
            BUDGET, MAX_STEPS, inner=optax.adam(0.1), compact=compact
        ),
        "id3_wrapper_adam_dense": osel.selective_id3(
            BUDGET, MAX_STEPS, inner=optax.adam(0.1), compact=False
        ),
        "id3_chain_sgd": optax.chain(osel.selective_id3(BUDGET, MAX_STEPS), optax.sgd(0.1)),
        # ID3's options: the running-average score (a state shaped, and sharded, like the
        # params) and the per-leaf cap (one top-k per capped leaf, on the shards)
        "id3_options_adam": osel.selective_id3(
            BUDGET, MAX_STEPS, inner=optax.adam(0.1), compact=compact, score_decay=0.5,
            leaf_share=0.4,
        ),
        "pafi": osel.selective_pafi(BUDGET, inner=optax.adamw(0.1), compact=compact),
        "bitfit": osel.selective_bitfit(BUDGET, inner=optax.adam(0.1), compact=compact),
        "fft": osel.selective_fft(inner=optax.sgd(0.1)),
    }


def make_step(tx: optax.GradientTransformation):
    """One training step ``(params, opt_state, targets) -> (params, opt_state)``."""

    def step(params, opt_state, targets):
        grads = jax.grad(loss)(params, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def to_host(tree):
    """A pytree of numpy arrays (gathers sharded arrays; single-process only)."""
    return jax.tree.map(np.asarray, tree)


def assert_trees_identical(got, want, what: str) -> None:
    """Exact equality, bit for bit, leaf by leaf, with the leaf path in the message."""
    got_l = jax.tree_util.tree_leaves_with_path(got)
    want_l = jax.tree_util.tree_leaves_with_path(want)
    assert len(got_l) == len(want_l), f"{what}: {len(got_l)} leaves vs {len(want_l)}"
    for (path, g), (_, w) in zip(got_l, want_l):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}{jax.tree_util.keystr(path)}"
        assert g.tobytes() == w.tobytes(), (
            f"{what}{jax.tree_util.keystr(path)}: {int(np.sum(g != w))} entries differ"
        )


_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>all-gather|all-to-all|collective-permute|all-reduce|"
    r"reduce-scatter|ragged-all-to-all)(-start)?\("
)
_ARRAY = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, int]]:
    """``(op, largest result in elements)`` for each collective in compiled HLO text."""
    out = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dims in _ARRAY.findall(m.group("shape"))
        ]
        out.append((m.group("op"), max(sizes, default=0)))
    return out
