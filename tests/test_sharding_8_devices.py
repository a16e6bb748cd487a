"""Sharded selection on 8 simulated CPU devices, equal to the single-device run.

The device count is fixed when jax is first imported and the rest of the suite runs on one
device, so these tests run in a child pytest started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; each one is still collected and
reported here on its own, with the child's outcome and traceback (``tests/conftest.py``,
marker ``eight_devices``).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_selective as osel
from optax_selective import selection
from tests._dist_workers import common

pytestmark = [pytest.mark.eight_devices, pytest.mark.slow]

NAMES = list(common.optimizers())
STEPS = {n: common.STEPS for n in NAMES if n.startswith("id3")}
AUTO = ["id3_wrapper_adam", "id3_wrapper_adam_dense", "id3_options_adam", "pafi", "bitfit", "fft"]
EXPLICIT = ["id3_wrapper_adam_dense", "id3_chain_sgd", "pafi", "bitfit"]


def _mesh(axis_type):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))


def _run(name, params, targets, *, jit_init, compact=True, state=None):
    """Init (unless ``state`` is given) then train; returns the states after init and after
    each step."""
    tx = common.optimizers(compact)[name]
    if state is None:
        state = (jax.jit(tx.init) if jit_init else tx.init)(params)
    step = jax.jit(common.make_step(tx))
    states = [state]
    for _ in range(STEPS.get(name, 2)):
        params, state = step(params, state, targets)
        states.append(state)
    return params, states


@functools.cache
def reference(name, compact=True):
    """The single-device run of one optimizer: params and masks after init and each step."""
    params, targets = common.make_params()
    p, states = _run(
        name, jax.device_put(params, jax.devices()[0]), targets, jit_init=False, compact=compact
    )
    return common.to_host(p), [common.to_host(osel.selected_mask(s)) for s in states]


def _shard(tree, mesh):
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, common.specs()
    )


def _check_against_reference(name, params, states, want, check_placement):
    want_params, want_masks = want
    assert len(states) == len(want_masks)
    for t, (state, want) in enumerate(zip(states, want_masks)):
        mask = osel.selected_mask(state)
        common.assert_trees_identical(mask, want, f"{name} mask after step {t}")
        jax.tree.map(check_placement, mask, params)
    common.assert_trees_identical(params, want_params, f"{name} params")
    used = int(sum(np.sum(m) for m in jax.tree.leaves(want_masks[-1])))
    assert used == (common.NUM_ENTRIES if name == "fft" else common.BUDGET)


@pytest.mark.parametrize("context", [False, True], ids=["no-mesh-context", "set-mesh"])
@pytest.mark.parametrize("name", AUTO)
def test_auto_mode_matches_single_device(name, context):
    """Auto mode, params placed with NamedSharding, eager init, jitted steps; with and
    without ``jax.set_mesh`` (with it, selection takes the paths that stay on the shards).

    (A jitted init in auto mode cannot see the params' shardings, as for optax's own states:
    give it ``out_shardings``, or use explicit mode, tested below.)
    """
    mesh = _mesh(AxisType.Auto)
    params, targets = common.make_params()
    params, targets = _shard(params, mesh), _shard(targets, mesh)
    with jax.set_mesh(mesh) if context else contextlib.nullcontext():
        params, states = _run(name, params, targets, jit_init=False)
    _check_against_reference(name, params, states, reference(name), _assert_same_sharding)
    if name == "id3_wrapper_adam_dense":  # the inner optimizer's moments: sharded like params
        jax.tree.map(_assert_same_sharding, states[-1].inner_state[0].mu, params)


def _assert_same_sharding(x, ref):
    assert x.sharding.is_equivalent_to(ref.sharding, x.ndim), f"{x.sharding} vs {ref.sharding}"


@pytest.mark.parametrize("name", EXPLICIT)
def test_explicit_mode_matches_single_device_and_keeps_types(name):
    """Explicit mode (``jax.set_mesh``, shardings in the types), dense inner state: every
    result equal bit for bit (compact state: below, to float tolerance)."""
    want = reference(name, compact=False)  # outside the mesh context: one device
    mesh = _mesh(AxisType.Explicit)
    with jax.set_mesh(mesh):
        params, targets = common.make_params()
        params, targets = _shard(params, mesh), _shard(targets, mesh)
        tx = common.optimizers(compact=False)[name]
        eager = jax.tree.map(jax.typeof, tx.init(params))
        jitted = jax.tree.map(jax.typeof, jax.jit(tx.init)(params))
        assert eager == jitted, "eager and jitted init give differently typed states"
        out_params, states = _run(name, params, targets, jit_init=True, compact=False)
        types = [jax.tree.map(jax.typeof, s) for s in states]
        assert all(t == types[0] for t in types), "the state's type changed during training"

        def check_placement(mask, param):
            assert jax.typeof(mask).sharding.spec == jax.typeof(param).sharding.spec

        _check_against_reference(name, out_params, states, want, check_placement)


COMPACT = ["id3_wrapper_adam", "id3_options_adam", "pafi", "bitfit"]


@pytest.mark.parametrize("name", COMPACT)
@pytest.mark.parametrize("jit_init", [False, True], ids=["eager-init", "jit-init"])
def test_explicit_mode_compact_state_matches_single_device(name, jit_init):
    """Compact inner state (the default) on explicitly sharded params: the same masks, bit for
    bit, and the same params to float tolerance as the single-device compact run; masks keep
    the params' sharding, the compact vectors are replicated, and the state's type is stable."""
    want_params, want_masks = reference(name, compact=True)
    mesh = _mesh(AxisType.Explicit)
    with jax.set_mesh(mesh):
        params, targets = common.make_params()
        params, targets = _shard(params, mesh), _shard(targets, mesh)
        state = None if jit_init else _explicit_eager_compact_init(name)
        out_params, states = _run(name, params, targets, jit_init=jit_init, state=state)
        types = [jax.tree.map(jax.typeof, s) for s in states]
        assert all(t == types[0] for t in types), "the state's type changed during training"
    assert len(states) == len(want_masks)
    for t, (state, want) in enumerate(zip(states, want_masks)):
        mask = osel.selected_mask(state)
        common.assert_trees_identical(mask, want, f"{name} mask after step {t}")
        for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(out_params)):
            assert jax.typeof(m).sharding.spec == jax.typeof(p).sharding.spec
            assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (m.sharding, p.sharding)
    for path, got in jax.tree_util.tree_leaves_with_path(out_params):
        ref = want_params[path[0].key]
        spec = tuple(jax.typeof(got).sharding.spec)
        assert spec + (None,) * (got.ndim - len(spec)) == tuple(
            common.specs()[path[0].key]
        ) + (None,) * (got.ndim - len(common.specs()[path[0].key])), path
        np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=1e-6, err_msg=str(path))
    initial = common.make_params()[0]
    moved = sum(
        int(np.sum(np.asarray(got) != initial[p[0].key]))
        for p, got in jax.tree_util.tree_leaves_with_path(out_params)
    )
    assert 0 < moved <= common.BUDGET  # training happened, inside the budget
    compact = states[-1].inner_state
    for x in jax.tree.leaves(compact):
        assert all(p is None for p in jax.typeof(x).sharding.spec), jax.typeof(x)
    want_slots = reference_compact_slots(name)
    for got, want in zip(compact.slots, want_slots):
        assert np.array_equal(np.asarray(got), want), "slots differ from the single-device run"


@functools.cache
def _explicit_eager_compact_init(name):
    """The eager compact init on explicitly sharded params (call under ``jax.set_mesh``):
    ``tx.init`` called outside ``jax.jit``, as users do."""
    params, _ = common.make_params()
    return common.optimizers(compact=True)[name].init(_shard(params, _mesh(AxisType.Explicit)))


@functools.cache
def reference_compact_slots(name):
    params, targets = common.make_params()
    _, states = _run(name, jax.device_put(params, jax.devices()[0]), targets, jit_init=False)
    return [np.asarray(s) for s in states[-1].inner_state.slots]


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("id3_wrapper_adam", AxisType.Explicit),
        ("pafi", AxisType.Explicit),
        ("id3_wrapper_adam", AxisType.Auto),
        ("pafi", AxisType.Auto),
    ],
    ids=["id3-explicit", "pafi-explicit", "id3-auto", "pafi-auto"],
)
@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
def test_selection_never_gathers_scores_or_params(name, mode, compact):
    """No collective in the compiled program moves a leaf-sized array: the scores stay sharded.

    Every sharded leaf holds >= 2048 entries (256 per device); selecting needs only counts,
    thresholds or up to k_max = 75 candidates per device to be exchanged. Compact state moves
    O(budget) values: the slots' gradients and parameters, and (ID3) each device's new indices.
    """
    mesh = _mesh(mode)
    with jax.set_mesh(mesh):
        params, targets = common.make_params()
        params, targets = _shard(params, mesh), _shard(targets, mesh)
        tx = common.optimizers(compact=compact)[name]
        if name == "pafi":  # PaFI selects at init
            compiled = jax.jit(tx.init).lower(params).compile()
        else:
            eager_explicit = compact and mode == AxisType.Explicit
            state = _explicit_eager_compact_init(name) if eager_explicit else tx.init(params)
            compiled = jax.jit(common.make_step(tx)).lower(params, state, targets).compile()
    found = common.collectives(compiled.as_text())
    limit = common.WIDTH // 2
    if compact and name == "pafi":
        # Compact init lists the mask's true entries: each device its own first `budget`, all
        # exchanged once (8 * 300 indices here), O(devices * budget) and not O(leaf).
        limit = 8 * common.BUDGET + 1
    too_big = [(op, n) for op, n in found if n >= limit]
    assert not too_big, f"collectives moving (nearly) whole leaves: {too_big}"


def test_auto_mode_paths_with_and_without_mesh_context():
    """A jitted argument placed over a multi-device mesh carries that mesh in its type, so
    the counting path (on the shards) is chosen with or without ``jax.set_mesh``; an array
    on one device, even under a 1-device mesh context, takes the fast single-device path;
    concrete arrays split over devices are recognised without a context."""
    mesh = _mesh(AxisType.Auto)
    x = jax.device_put(np.ones((16, common.WIDTH), np.float32), NamedSharding(mesh, P("data", "model")))
    seen = {}

    def probe(a, key):
        seen[key] = selection.choose_path([a], 16)
        return a

    jax.jit(functools.partial(probe, key="jit"))(x)
    with jax.set_mesh(mesh):
        jax.jit(functools.partial(probe, key="jit-set-mesh"))(x)
        one = jax.make_mesh((1, 1), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(one):
        jax.jit(functools.partial(probe, key="jit-1-device-mesh"))(np.ones((16, common.WIDTH), np.float32))
    jax.jit(functools.partial(probe, key="jit-one-device"))(np.ones((16, common.WIDTH), np.float32))
    assert seen == {
        "jit": "counting",
        "jit-set-mesh": "counting",
        "jit-1-device-mesh": "rows",
        "jit-one-device": "rows",
    }
    assert selection.choose_path([x], 16) == "counting"  # concrete, split over devices


def test_collective_parser_sees_a_gather():
    """The check above can fail: a program that does gather a leaf is caught."""
    mesh = _mesh(AxisType.Auto)
    x = jax.device_put(
        np.ones((8, common.WIDTH), np.float32), NamedSharding(mesh, P("data", "model"))
    )
    gathered = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P()))
    found = common.collectives(gathered.lower(x).compile().as_text())
    assert any(n >= common.WIDTH for _, n in found), found
