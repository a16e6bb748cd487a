"""optax_selective.selection against a numpy reference over the concatenated scores: every exact top-k path
of ``top_k_masks`` picks what the simple reference picks."""

import os
import subprocess
import sys
import textwrap

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from optax_selective import selection
from optax_selective.selection import topk
from tests._reference import numpy_top_k

shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@given(shapes=shapes, seed=st.integers(0, 2**16), k=st.integers(0, 30), ties=st.booleans())
def test_top_k_masks_matches_numpy_reference(shapes, seed, k, ties):
    rng = np.random.default_rng(seed)
    scores = []
    for s in shapes:
        x = rng.integers(0, 3, size=s).astype(np.float32) if ties else rng.normal(size=s).astype(np.float32)
        x[rng.random(size=s) < 0.1] = np.nan
        x[rng.random(size=s) < 0.05] = -np.inf
        scores.append(x)
    k_max = k + 2
    got = selection.top_k_masks([jnp.asarray(s) for s in scores], k, k_max)
    clean = [np.where(np.isfinite(s), s, -np.inf) for s in scores]
    want = numpy_top_k(clean, k)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_top_k_masks_skips_none_and_keeps_leaf_shapes():
    scores = [jnp.array([[1.0, 5.0]]), None, jnp.array([3.0])]
    got = selection.top_k_masks(scores, 2, 2)
    assert got[1] is None
    assert got[0].tolist() == [[False, True]] and got[2].tolist() == [True]


def test_zero_scores_tie_by_global_index_not_leaf_size():
    # The reference let zero-gradient entries in early leaves take the budget; here a real
    # gradient always wins over a zero one, and ties among zeros go to the lowest index.
    scores = [jnp.zeros(4), jnp.array([0.0, 2.0])]
    got = selection.top_k_masks(scores, 2, 2)
    assert got[0].tolist() == [True, False, False, False]
    assert got[1].tolist() == [False, True]


def test_d3_score_excludes_non_finite():
    g = jnp.array([1.0, jnp.nan, jnp.inf, 2.0])
    p = jnp.array([1.0, 1.0, 1.0, 0.0])
    s = selection.d3_score(g, p, exp=1.0, eps=1.0)
    assert s.tolist()[0] == 0.5 and s.tolist()[3] == 2.0
    assert s.tolist()[1] == -np.inf and s.tolist()[2] == -np.inf


@given(b=st.integers(1, 500), t=st.integers(1, 60))
def test_id3_increment_sums_to_budget(b, t):
    ks = [int(selection.id3_increment(jnp.int32(i), jnp.int32(b), t)) for i in range(t + 3)]
    assert sum(ks) == b
    assert max(ks) <= selection.max_increment(b, t)
    assert ks[t:] == [0, 0, 0]


def test_top_k_is_jittable_with_traced_k():
    f = jax.jit(lambda s, k: selection.top_k_masks(s, k, 3))
    out = f([jnp.array([1.0, 3.0, 2.0])], jnp.int32(2))
    assert out[0].tolist() == [False, True, True]


# Every exact top-k path of selection.top_k_masks picks what the simple reference picks.

PATHS = ["reference", "rows", "radix", "counting"]


def make_scores(seed, shapes, kind):
    rng = np.random.default_rng(seed)
    scores = []
    for shape in shapes:
        if shape is None:
            scores.append(None)
            continue
        if kind == "ties":
            x = rng.integers(-2, 3, size=shape).astype(np.float32)
            x[(x == 0) & (rng.random(size=shape) < 0.5)] = -0.0
        elif kind == "zeros":
            x = np.zeros(shape, np.float32)
        else:
            x = rng.normal(size=shape).astype(np.float32)
        x[rng.random(size=shape) < 0.1] = np.nan
        x[rng.random(size=shape) < 0.05] = -np.inf
        x[rng.random(size=shape) < 0.03] = np.inf
        scores.append(x)
    return scores


shape_st = st.one_of(st.none(), st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple))


@given(
    shapes=st.lists(shape_st, min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    k=st.integers(0, 40),
    slack=st.integers(0, 3),
    kind=st.sampled_from(["normal", "ties", "zeros"]),
)
# 12 examples (every one compiles four paths for new shapes); each path is also checked on
# fixed inputs with many ties under jit (test_paths_under_jit_with_traced_k_and_large_ties).
@settings(max_examples=12)
def test_every_path_matches_the_reference(shapes, seed, k, slack, kind):
    scores = make_scores(seed, shapes, kind)
    want = numpy_top_k(scores, k)
    args = [None if s is None else jnp.asarray(s) for s in scores]
    ref = selection.top_k_masks_reference(args, k, k + slack)
    for path in PATHS:
        got = selection.top_k_masks(args, k, k + slack, path=path)
        for g, r, w in zip(got, ref, want):
            if w is None:
                assert g is None and r is None
                continue
            assert g.shape == w.shape and g.dtype == jnp.bool_
            np.testing.assert_array_equal(np.asarray(r), w)
            np.testing.assert_array_equal(np.asarray(g), w, err_msg=f"path {path}")


@given(seed=st.integers(0, 2**16), k=st.integers(0, 12), kind=st.sampled_from(["normal", "ties"]))
def test_top_k_indices_agree_with_masks(seed, k, kind):
    scores = [jnp.asarray(s) for s in make_scores(seed, [(40, 30), (3,), (), (50,)], kind)]
    leaf, local, valid = selection.top_k_indices(scores, k, 12)
    assert leaf.shape == local.shape == valid.shape == (12,)
    masks = selection.indices_to_masks(scores, leaf, local, valid)
    for m, w in zip(masks, numpy_top_k([np.asarray(s) for s in scores], k)):
        np.testing.assert_array_equal(np.asarray(m), w)


@pytest.mark.parametrize("path", PATHS)
def test_paths_under_jit_with_traced_k_and_large_ties(path):
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=(300, 70)), 1).astype(np.float32)  # many ties
    b = np.zeros(500, np.float32)
    scores = [jnp.asarray(a), jnp.asarray(b)]
    f = jax.jit(lambda s, k: selection.top_k_masks(s, k, 3000, path=path))
    for k in (0, 1, 777, 3000):
        got = f(scores, jnp.int32(k))
        for g, w in zip(got, numpy_top_k([a, b], k)):
            np.testing.assert_array_equal(np.asarray(g), w)
    assert f._cache_size() == 1


def test_default_paths_for_large_inputs():
    big = [jnp.zeros((512, 256)), jnp.zeros(64)]
    assert selection.choose_path(big, 16) == "rows"
    assert selection.choose_path(big, 60_000) == "radix"
    assert selection.choose_path([jnp.zeros(100)], 5) == "reference"


@pytest.mark.parametrize("c", [8, 16, 128, 4096])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_grouped_row_maxima_equal_a_plain_row_max(c, kind):
    """The grouped one-pass row maxima are the plain maxima, with non-finite scores as -inf."""
    (x,) = make_scores(c, [(16, c)], kind)
    g, mask = np.abs(x), (np.arange(x.size).reshape(x.shape) % 7) == 0
    score = lambda g, m: jnp.where(m, -jnp.inf, g * 2)  # noqa: E731
    got = jax.jit(lambda g, m: topk._row_maxima((g, m), score))(g, mask)
    want = np.where(mask, -np.inf, g * 2)
    want = np.where(np.isfinite(want), want, -np.inf).max(axis=1)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_order_key_is_monotone_and_marks_non_finite():
    x = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, np.inf, np.nan], np.float32)
    key = np.asarray(selection.order_key(jnp.asarray(x))).astype(np.int64)
    finite = key[1:-2]
    assert key[0] == 0 and key[-1] == 0 and key[-2] == 0
    assert (np.diff(finite) >= 0).all() and finite[3] == finite[4]  # -0.0 == 0.0
    assert (finite >= 0x00800000).all()


@pytest.mark.side
def test_counting_path_runs_on_explicitly_sharded_scores():
    # lax.top_k, reshape, gather and cumsum are refused along a sharded axis under explicit
    # sharding; the counting path uses only elementwise ops and reductions.
    code = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        from optax_selective import selection
        mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit,))
        rng = np.random.default_rng(1)
        a = np.round(rng.normal(size=(16, 6)), 1).astype(np.float32)
        b = rng.normal(size=(8,)).astype(np.float32)
        with jax.set_mesh(mesh):
            sa = jax.device_put(a, NamedSharding(mesh, P("x", None)))
            sb = jax.device_put(b, NamedSharding(mesh, P("x")))
            assert selection.choose_path([sa, sb], 5) == "counting"
            got = jax.jit(lambda s, k: selection.top_k_masks(s, k, 20))([sa, sb], 13)
        want = selection.top_k_masks_reference([jnp.asarray(a), jnp.asarray(b)], 13, 20)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        print("OK")
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_pafi_init_uses_the_radix_path_and_matches_numpy():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(300, 200)), jnp.float32), "b": jnp.zeros(200)}
    from optax_selective import methods
    from optax_selective._tree import make_layout

    scores = [selection.smallest_magnitude_score(p) for p in jax.tree.leaves(params)]
    assert selection.choose_path(scores, 30_000) == "radix"
    mask, _ = methods.PaFI(30_000).init(jax.tree.leaves(params), make_layout(params))
    want = numpy_top_k([np.asarray(s) for s in scores], 30_000)
    for m, w in zip(mask, want):
        np.testing.assert_array_equal(np.asarray(m), w)


@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_rows_path_with_score_fn_matches_materialised_scores(kind):
    # Large leaves are scored row by row from (g, theta, mask), small ones share one view.
    rng = np.random.default_rng(7)
    shapes = [(256, 96), (96,), (3, 5), (128, 64), ()]
    grads = [jnp.asarray(np.round(rng.normal(size=s), 1 if kind == "ties" else 6), jnp.float32) for s in shapes]
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    masks = [jnp.asarray(rng.random(size=s) < 0.2) for s in shapes]

    def score(g, p, m):
        return selection.exclude(selection.d3_score(g, p, 1.0, 1e-3), m)

    inputs = [(g, p, m) for g, p, m in zip(grads, params, masks)]
    inputs[2] = None  # a leaf that takes no part
    scores = [None if x is None else score(*x) for x in inputs]
    assert selection.choose_path(scores, 40) == "rows"
    for k in (0, 1, 17, 40):
        got = jax.jit(lambda xs, k: selection.top_k_indices(xs, k, 40, score_fn=score))(inputs, k)
        masks_got = selection.indices_to_masks(scores, *got)
        for g, w in zip(masks_got, numpy_top_k([None if s is None else np.asarray(s) for s in scores], k)):
            if w is None:
                assert g is None
            else:
                np.testing.assert_array_equal(np.asarray(g), w)


def _blocks(shape, rows, cols):
    """Row/column blocks of a 2-D shape: ``(row slice, col slice)`` pairs, some empty."""
    r_cut = np.linspace(0, shape[0], rows + 1).astype(int)
    c_cut = np.linspace(0, shape[1], cols + 1).astype(int)
    return [
        (slice(r_cut[i], r_cut[i + 1]), slice(c_cut[j], c_cut[j + 1]))
        for i in range(rows)
        for j in range(cols)
    ]


# Jitted, as the torch bridge's FSDP2 runner calls them: one program per shard's shapes instead
# of one per operation (half the time of the eager calls here).
_shard_candidates = jax.jit(selection.shard_candidates, static_argnums=1)
_merge_candidates = jax.jit(selection.merge_candidates, static_argnums=(3, 4))


@given(
    seed=st.integers(0, 2**16),
    k=st.integers(0, 30),
    slack=st.integers(0, 3),
    rows=st.integers(1, 4),
    cols=st.integers(1, 3),
    kind=st.sampled_from(["normal", "ties", "zeros"]),
)
@settings(max_examples=15, deadline=None)
def test_merging_shard_candidates_matches_the_global_top_k(seed, k, slack, rows, cols, kind):
    # Each leaf is cut into rows x cols blocks (shards, some empty); every shard offers its own
    # top-k_max, local indices are mapped into the leaf, and the merge must pick exactly the
    # global top-k, ties included (the rule the FSDP2 runner and sharded JAX selection share).
    shapes = [(7, 5), (6, 1), (3, 4)]
    scores = make_scores(seed, shapes, kind)
    k_max = k + slack
    vals, leaves, indices = [], [], []
    for b in range(rows * cols):
        local = [s[_blocks(s.shape, rows, cols)[b]] for s in scores]
        v, leaf, idx, valid = _shard_candidates([jnp.asarray(x) for x in local], k_max)
        leaf, idx, valid = np.array(leaf), np.array(idx), np.array(valid)
        assert (np.asarray(v)[~valid] == -np.inf).all()
        for j in range(k_max):  # local (row, col) in the block -> row-major index in the leaf
            rs, cs = _blocks(shapes[leaf[j]], rows, cols)[b]
            width = max(1, cs.stop - cs.start)
            r, c = divmod(int(idx[j]), width)
            idx[j] = (rs.start + r) * shapes[leaf[j]][1] + cs.start + c if valid[j] else 0
        vals.append(np.asarray(v))
        leaves.append(leaf)
        indices.append(idx)
    order = np.random.default_rng(seed).permutation(sum(len(v) for v in vals))  # any order
    merged = _merge_candidates(
        jnp.asarray(np.concatenate(vals)[order]),
        jnp.asarray(np.concatenate(leaves)[order]),
        jnp.asarray(np.concatenate(indices)[order].astype(np.int32)),
        k,
        k_max,
    )
    got = selection.indices_to_masks([jnp.asarray(s) for s in scores], *merged)
    for g, w in zip(got, numpy_top_k(scores, k)):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_one_device_explicit_mesh_takes_the_fast_paths():
    # A 1-device mesh in explicit mode names an axis in the type but splits nothing: the paths
    # for unsharded arrays must run (not the slower counting path), and select the same.
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(5)
    a = np.round(rng.normal(size=(512, 256)), 1).astype(np.float32)
    b = rng.normal(size=(256,)).astype(np.float32)
    mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        sa = jax.device_put(a, NamedSharding(mesh, P("x", None)))
        sb = jax.device_put(b, NamedSharding(mesh, P("x")))
        assert jax.typeof(sa).sharding.spec == P("x", None)
        paths = {}

        def select(s, k, k_max):
            paths[k_max] = selection.choose_path(s, k_max)  # as seen on the traced values
            return selection.top_k_masks(s, k, k_max)

        for k_max in (16, 60_000):
            got = jax.jit(select, static_argnums=2)([sa, sb], k_max - 3, k_max)
            for g, w in zip(got, numpy_top_k([a, b], k_max - 3)):
                np.testing.assert_array_equal(np.asarray(g), w)
    assert paths == {16: "rows", 60_000: "radix"}, paths
