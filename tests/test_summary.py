"""SparseSummary: make / apply / save / load, sizes, bad input and corrupt folders."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import optax_selective as osel
from optax_selective.summary import index_dtype


def _params(width=8, dtype=jnp.float32, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "dense": {
            "kernel": jax.random.normal(k1, (6, width), dtype),
            "bias": jax.random.normal(k2, (width,), dtype) * 0.1,
        },
        "head": {"kernel": jax.random.normal(k3, (width, 3), dtype)},
        "step": jnp.array(3, jnp.int32),  # never selected
    }


def _train(params, tx, steps=4, seed=1):
    state = tx.init(params)
    floats = {"dense": params["dense"], "head": params["head"]}

    @jax.jit
    def step(params, state, key):
        grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype), floats)
        grads["step"] = jnp.zeros([], jnp.int32)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    key = jax.random.key(seed)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, state = step(params, state, sub)
    return params, state


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("form", ["wrapper", "chain"])
def test_round_trip_reproduces_finetuned_params(tmp_path, form):
    pre = _params()
    if form == "wrapper":
        tx = osel.selective_id3(budget=20, max_steps=3, inner=optax.adamw(0.1, weight_decay=0.1))
    else:
        tx = optax.chain(osel.selective_id3(budget=20, max_steps=3), optax.adam(0.1))
    tuned, state = _train(pre, tx)
    summary = osel.make_summary(tuned, state)
    assert summary.method == "id3"
    assert summary.version == osel.__version__
    assert summary.budget_used == osel.budget_used(state) == 20
    assert sum(leaf.indices.size for leaf in summary.leaves) == 20
    for leaf in summary.leaves:
        assert leaf.indices.dtype == np.int32
        assert np.all(np.diff(leaf.indices) > 0)

    osel.save_summary(tmp_path / "s", summary)
    loaded = osel.load_summary(tmp_path / "s")
    assert (loaded.method, loaded.version, loaded.budget_used) == ("id3", osel.__version__, 20)
    assert [leaf.key for leaf in loaded.leaves] == [leaf.key for leaf in summary.leaves]
    for a, b in zip(loaded.leaves, summary.leaves):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert isinstance(a.values, np.ndarray) and isinstance(a.indices, np.ndarray)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values, b.values)

    restored = osel.apply_summary(pre, loaded)
    _assert_trees_equal(restored, tuned)  # unselected entries never moved (exact in both forms)
    assert isinstance(restored["dense"]["kernel"], jax.Array)


def test_summary_keys_are_tree_paths_and_values_match():
    params = {"w": jnp.array([[0.5, -0.1], [2.0, 0.0]]), "b": jnp.array([3.0])}
    state = osel.selective_pafi(budget=2).init(params)
    summary = osel.make_summary(params, state, method="pafi")
    assert summary.method == "pafi"
    (leaf,) = summary.leaves
    assert leaf.key == "['w']" == jax.tree_util.keystr((jax.tree_util.DictKey("w"),))
    assert leaf.shape == (2, 2)
    assert leaf.indices.tolist() == [1, 3]
    np.testing.assert_array_equal(leaf.values, np.array([-0.1, 0.0], np.float32))


def test_method_name_defaults():
    params = {"w": jnp.arange(4.0)}
    assert osel.make_summary(params, osel.selective_pafi(budget=1).init(params)).method == "pafi"
    assert osel.make_summary(params, osel.selective_pafi(budget=1).init(params),
                             method="mine").method == "mine"
    id3 = optax.chain(osel.selective_id3(budget=1, max_steps=1), optax.sgd(1.0))
    assert osel.make_summary(params, id3.init(params)).method == "id3"
    with pytest.raises(TypeError, match="method"):
        osel.make_summary(params, id3.init(params), method="")


def test_apply_is_pure_and_keeps_numpy_leaves():
    params = {"w": np.zeros(4, np.float32)}
    leaf = osel.SummaryLeaf(
        "['w']", (4,), np.float32, np.array([2], np.int32), np.ones(1, np.float32)
    )
    out = osel.apply_summary(params, osel.SparseSummary((leaf,), 1, "pafi"))
    assert isinstance(out["w"], np.ndarray)
    assert out["w"].tolist() == [0, 0, 1, 0]
    assert params["w"].tolist() == [0, 0, 0, 0]


def test_size_grows_with_budget_not_model(tmp_path):
    sizes = {}
    for width in (64, 4096):
        for budget in (16, 400):
            pre = _params(width)
            tx = osel.selective_pafi(budget=budget)
            summary = osel.make_summary(pre, tx.init(pre), method="pafi")
            assert summary.budget_used == budget
            path = tmp_path / f"w{width}_b{budget}"
            osel.save_summary(path, summary)
            sizes[width, budget] = _dir_bytes(path)
    # The big model has 64x the entries of the small one.
    assert sum(x.size for x in jax.tree.leaves(_params(4096))) > 60 * sum(
        x.size for x in jax.tree.leaves(_params(64))
    )
    big_model_bytes = sum(x.nbytes for x in jax.tree.leaves(_params(4096)))
    for budget in (16, 400):
        # The model grew by ~160 KB; the summary by less than its raw index bytes (sparser
        # indices compress less well), i.e. not with the model.
        assert abs(sizes[4096, budget] - sizes[64, budget]) <= 4 * budget + 200, sizes
        assert sizes[4096, budget] < 0.05 * big_model_bytes, sizes
    for width in (64, 4096):
        # 384 more entries: at least their float32 values (random, incompressible) are added.
        assert sizes[width, 400] - sizes[width, 16] > 384 * 4, sizes


def test_leaves_without_selected_entries_are_left_out(tmp_path):
    params = {"a": jnp.array([0.0, 5.0]), "b": jnp.array([7.0, 8.0, 9.0]), "c": jnp.ones((2, 2))}
    state = osel.selective_pafi(budget=1).init(params)
    summary = osel.make_summary(params, state, method="pafi")
    assert [leaf.key for leaf in summary.leaves] == ["['a']"]
    osel.save_summary(tmp_path / "s", summary)
    assert [leaf.key for leaf in osel.load_summary(tmp_path / "s").leaves] == ["['a']"]


def test_empty_leaves_and_empty_summary_round_trip(tmp_path):
    empty = osel.SummaryLeaf(
        "['e']", (3,), ml_dtypes.bfloat16, np.zeros(0, np.int32), np.zeros(0, ml_dtypes.bfloat16)
    )
    full = osel.SummaryLeaf(
        "['f']", (2,), np.float32, np.array([1], np.int32), np.array([4.0], np.float32)
    )
    summary = osel.SparseSummary((empty, full), 1, "custom")
    osel.save_summary(tmp_path / "s", summary)
    loaded = osel.load_summary(tmp_path / "s")
    assert [(x.key, x.indices.size, x.dtype) for x in loaded.leaves] == [
        ("['e']", 0, np.dtype(ml_dtypes.bfloat16)),
        ("['f']", 1, np.dtype(np.float32)),
    ]
    # An empty leaf is still checked when applied.
    with pytest.raises(ValueError, match=r"\['e'\]: no such leaf"):
        osel.apply_summary({"f": jnp.zeros(2)}, loaded)

    # Nothing selected yet (ID3 before its first step): no arrays at all.
    params = {"w": jnp.arange(3.0)}
    state = optax.chain(osel.selective_id3(budget=2, max_steps=2), optax.sgd(1.0)).init(params)
    nothing = osel.make_summary(params, state)
    assert nothing.leaves == () and nothing.budget_used == 0
    osel.save_summary(tmp_path / "nothing", nothing)
    loaded = osel.load_summary(tmp_path / "nothing")
    assert loaded.leaves == () and loaded.method == "id3"
    _assert_trees_equal(osel.apply_summary(params, loaded), params)


def test_bfloat16_round_trip_bit_exact(tmp_path):
    pre = _params(dtype=jnp.bfloat16)
    tx = osel.selective_id3(budget=12, max_steps=2, inner=optax.sgd(0.3))
    tuned, state = _train(pre, tx, steps=2)
    summary = osel.make_summary(tuned, state)
    assert {leaf.dtype for leaf in summary.leaves} == {np.dtype(ml_dtypes.bfloat16)}
    osel.save_summary(tmp_path / "s", summary)
    loaded = osel.load_summary(tmp_path / "s")
    for a, b in zip(loaded.leaves, summary.leaves):
        assert a.values.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(a.values.view(np.uint16), b.values.view(np.uint16))
    restored = osel.apply_summary(pre, loaded)
    _assert_trees_equal(restored, tuned)


def test_nnx_state_round_trip(tmp_path):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    pre = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, osel.selective_pafi(budget=10, inner=optax.sgd(0.1)), wrt=nnx.Param)
    x, y = jnp.ones((3, 4)), jnp.zeros((3, 2))
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    summary = osel.make_summary(nnx.state(model, nnx.Param), opt.opt_state, method="pafi")
    assert summary.budget_used == 10
    assert all(not leaf.key.endswith(".value") for leaf in summary.leaves)
    osel.save_summary(tmp_path / "s", summary)

    fresh = MLP(nnx.Rngs(0))
    _assert_trees_equal(nnx.state(fresh, nnx.Param), pre)
    nnx.update(
        fresh, osel.apply_summary(nnx.state(fresh, nnx.Param), osel.load_summary(tmp_path / "s"))
    )
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))


# --- bad input ------------------------------------------------------------------------------


def _summary_of(params, budget=3):
    return osel.make_summary(params, osel.selective_pafi(budget=budget).init(params), method="pafi")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: {"other": p["w"], "b": p["b"]}, r"\['w'\]: no such leaf in params"),
        (
            lambda p: {"w": jnp.zeros((4, 3)), "b": p["b"]},
            r"\['w'\]: summary shape \(3, 4\), params shape \(4, 3\)",
        ),
        (
            lambda p: {"w": p["w"].astype(jnp.bfloat16), "b": p["b"]},
            r"\['w'\]: summary dtype float32, params dtype bfloat16",
        ),
    ],
    ids=["structure", "shape", "dtype"],
)
def test_apply_checks_everything_before_changing_anything(mutate, message):
    params = {"w": jnp.arange(12.0).reshape(3, 4) - 6.0, "b": jnp.array([0.01, 9.0])}
    summary = _summary_of(params)
    assert {leaf.key for leaf in summary.leaves} == {"['w']", "['b']"}
    target = mutate(jax.tree.map(lambda x: x + 1, params))
    before = jax.tree.map(np.array, target)
    with pytest.raises(ValueError, match=message) as err:
        osel.apply_summary(target, summary)
    assert "nothing was applied" in str(err.value)
    _assert_trees_equal(target, before)  # the well-matched leaf ['b'] was not touched either


def test_apply_rejects_non_summary():
    with pytest.raises(TypeError, match="summary must be a SparseSummary"):
        osel.apply_summary({"w": jnp.zeros(2)}, {"w": 1})


def test_make_summary_rejects_params_not_matching_state():
    params = {"w": jnp.arange(4.0)}
    state = osel.selective_pafi(budget=1).init(params)
    with pytest.raises(ValueError, match=r"keys only in the mask \[\"\['w'\]\"\]"):
        osel.make_summary({"v": jnp.arange(4.0)}, state)
    with pytest.raises(ValueError, match="has shape"):
        osel.make_summary({"w": jnp.arange(5.0)}, state)
    with pytest.raises(ValueError, match="expected exactly one SelectiveState"):
        osel.make_summary(params, optax.sgd(1.0).init(params))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(indices=np.array([1], np.int64)), "1-D int32 array"),
        (dict(indices=np.array([[1]], np.int32)), "1-D int32 array"),
        (dict(values=np.array([1.0, 2.0], np.float32)), "as long as indices"),
        (dict(values=np.array([1.0], np.float64)), "dtype float64"),
        (dict(indices=np.array([4], np.int32)), r"within \[0, 4\)"),
        (dict(indices=np.array([-1], np.int32)), r"within \[0, 4\)"),
        (dict(dtype=np.int32, values=np.array([1], np.int32)), "dtype must be one of"),
    ],
)
def test_summary_leaf_validates(kwargs, message):
    args = dict(
        key="['w']",
        shape=(4,),
        dtype=np.float32,
        indices=np.array([1], np.int32),
        values=np.array([1.0], np.float32),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        osel.SummaryLeaf(**args)


def test_summary_validates():
    leaf = osel.SummaryLeaf(
        "['w']", (4,), np.float32, np.array([1, 2], np.int32), np.array([1.0, 2.0], np.float32)
    )
    with pytest.raises(ValueError, match="budget_used is 3 but its leaves hold 2"):
        osel.SparseSummary((leaf,), 3, "pafi")
    with pytest.raises(ValueError, match="duplicate leaf keys"):
        osel.SparseSummary((leaf, leaf), 4, "pafi")
    with pytest.raises(TypeError, match="must hold SummaryLeaf"):
        osel.SparseSummary(("x",), 0, "pafi")


def test_index_dtype_switches_to_int64_at_2_31():
    assert index_dtype(2**31 - 1) == np.int32
    assert index_dtype(2**31) == np.int64
    big = osel.SummaryLeaf(
        "['w']",
        (2**16, 2**15),
        np.float32,
        np.array([2**31 - 1], np.int64),
        np.array([1.0], np.float32),
    )
    assert big.indices.dtype == np.int64
    with pytest.raises(ValueError, match="1-D int64 array"):
        osel.SummaryLeaf(
            "['w']", (2**31,), np.float32, np.array([0], np.int32), np.array([1.0], np.float32)
        )


# --- files ----------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    params = {"w": jnp.arange(12.0).reshape(3, 4) - 5.5, "b": jnp.ones(3, jnp.bfloat16)}
    summary = _summary_of(params, budget=4)
    path = tmp_path / "s"
    osel.save_summary(path, summary)
    return path, summary


def test_save_refuses_to_overwrite_unless_asked(saved):
    path, summary = saved
    with pytest.raises(FileExistsError, match="overwrite=True"):
        osel.save_summary(path, summary)
    osel.save_summary(path, summary, overwrite=True)
    assert osel.load_summary(path).budget_used == 4
    with pytest.raises(TypeError, match="summary must be a SparseSummary"):
        osel.save_summary(path.parent / "x", "not a summary")


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no summary folder"):
        osel.load_summary(tmp_path / "missing")


def _data_files(path):
    files = glob.glob(f"{path}/arrays/leaf_*/0")
    assert len(files) == 4  # two leaves, indices and values
    return files


def _truncate_data(path):
    for f in _data_files(path):
        with open(f, "r+b") as fh:
            fh.truncate(10)


def _flip_data_byte(path):
    for f in _data_files(path):
        data = bytearray(open(f, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(f, "wb").write(data)


def _edit_meta(path, edit):
    file = path / "metadata" / "metadata"
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))


def _wrong_digest(meta):
    meta["leaves"][0]["sha256"] = "0" * 64


def _wrong_count(meta):
    meta["leaves"][0]["count"] += 1
    meta["budget_used"] += 1


def _unknown_dtype(meta):
    meta["leaves"][0]["dtype"] = "object"


def _future_version(meta):
    meta["format_version"] = 99


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_truncate_data, "could not read its arrays"),
        (_flip_data_byte, "could not read its arrays|does not match the recorded SHA-256"),
        (lambda p: __import__("shutil").rmtree(p / "arrays"), "array 'leaf_0000' is missing"),
        (
            lambda p: os.remove(p / "arrays" / "leaf_0001.values" / ".zarray"),
            "could not read its arrays",
        ),
        (
            lambda p: os.remove(p / "arrays" / "leaf_0001.values" / "0"),
            "could not read its arrays|SHA-256",
        ),
        (lambda p: (p / "metadata" / "metadata").write_text("{not json"), "not valid JSON"),
        (lambda p: os.remove(p / "metadata" / "metadata"), "could not read its metadata"),
        (lambda p: (p / "metadata" / "metadata").write_text("[1, 2]"), "does not say format"),
        (lambda p: _edit_meta(p, _wrong_digest), "does not match the recorded SHA-256"),
        (lambda p: _edit_meta(p, _wrong_count), "expected 3 entries"),
        (lambda p: _edit_meta(p, _unknown_dtype), "unsupported dtype 'object'"),
        (lambda p: _edit_meta(p, _future_version), "format_version 99 is not supported"),
        (lambda p: _edit_meta(p, lambda m: m.pop("method")), "'method' is missing"),
    ],
    ids=[
        "truncated-data",
        "flipped-byte",
        "no-arrays",
        "no-zarray",
        "no-chunk",
        "bad-json",
        "no-metadata",
        "not-a-summary",
        "digest",
        "count",
        "dtype",
        "version",
        "field",
    ],
)
# When tensorstore fails to read a broken chunk, orbax's closed event loop later receives a
# stray callback ("Event loop is closed"); harmless, and not ours to fix.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_folder_raises_clear_error(saved, corrupt, message):
    path, _ = saved
    corrupt(path)
    with pytest.raises(osel.SummaryFormatError, match=message) as err:
        osel.load_summary(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_empty_folder_is_not_a_summary(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(osel.SummaryFormatError, match="could not read its metadata"):
        osel.load_summary(tmp_path / "empty")


def test_accelerator_path_matches_host_path(monkeypatch):
    """The compiled count/gather/scatter used for accelerator arrays gives the same result."""
    from optax_selective.summary import make as summary_mod

    pre = _params(dtype=jnp.bfloat16)
    tuned, state = _train(pre, osel.selective_id3(budget=9, max_steps=2, inner=optax.sgd(0.5)), 2)
    host = osel.make_summary(tuned, state)
    monkeypatch.setattr(summary_mod, "_in_host_memory", lambda x: False)
    device = osel.make_summary(tuned, state)
    assert [leaf.key for leaf in device.leaves] == [leaf.key for leaf in host.leaves]
    for a, b in zip(device.leaves, host.leaves):
        assert a.indices.dtype == b.indices.dtype == np.int32
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values.view(np.uint16), b.values.view(np.uint16))
    _assert_trees_equal(osel.apply_summary(pre, device), tuned)




def test_summary_saved_on_cuda_loads_on_cpu(cuda_fixture):
    """tests/data/saved_on_cuda was written on an H100 (see make_fixture.py there)."""
    fixture, make_fixture = cuda_fixture
    summary = osel.load_summary(os.path.join(fixture, "summary"))
    assert (summary.method, summary.budget_used) == ("id3", 38)
    expected = np.load(os.path.join(fixture, "expected.npz"))
    params, _ = make_fixture.fixture_params_and_tx()
    applied = osel.apply_summary(params, summary)
    for key in params:
        mask = expected[f"m_{key}"]
        got = np.asarray(applied[key])
        assert list(applied[key].devices())[0].platform == "cpu"
        np.testing.assert_array_equal(got.astype(np.float32)[mask], expected[f"p_{key}"][mask])
        np.testing.assert_array_equal(got[~mask], np.asarray(params[key])[~mask])


@pytest.mark.parametrize("name", ["id3", "pafi", "bitfit", "fish", "random", "fft"])
def test_make_summary_records_every_method_by_itself(name):
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = {
        "id3": lambda: osel.selective_id3(budget=3, max_steps=1),
        "pafi": lambda: osel.selective_pafi(budget=3),
        "bitfit": lambda: osel.selective_bitfit(budget=3),
        "fish": lambda: osel.selective_fish(budget=3, fish_steps=1),
        "random": lambda: osel.selective_random(budget=3, seed=0),
        "fft": lambda: osel.selective_fft(),
    }[name]()
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert osel.make_summary(params, state).method == name
