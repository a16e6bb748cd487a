"""Summaries as adapters, JAX side and the shared core: folders, attach / detach, merging
(against a dense NumPy reference), the command line."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import optax_selective as osel
from optax_selective.adapters import core, merge_folders
from optax_selective.adapters.cli import main as cli_main


def _params(dtype=jnp.float32, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"dense": {"kernel": jax.random.normal(k1, (6, 8), dtype),
                      "bias": jax.random.normal(k2, (8,), dtype) * 0.1},
            "head": {"kernel": jax.random.normal(k3, (8, 3), dtype)}}


_STEPS = {}


def _train(params, tx, steps=3, seed=1):
    """A few real selective steps (random gradients); one compiled step per (tx, dtype)."""
    state = tx.init(params)
    key_ = (id(tx), jax.tree.map(lambda x: (x.shape, x.dtype), params).__repr__())
    if key_ not in _STEPS:
        @jax.jit
        def step(params, state, key):
            leaves, tree = jax.tree.flatten(params)
            keys = jax.random.split(key, len(leaves))
            grads = tree.unflatten([jax.random.normal(k, x.shape, x.dtype)
                                    for k, x in zip(keys, leaves)])
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
        _STEPS[key_] = step
    key = jax.random.key(seed)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, state = _STEPS[key_](params, state, sub)
    return params, state


def _bits(tree):
    return [np.asarray(x).view(np.uint8).tobytes() for x in jax.tree.leaves(tree)]


_PAFI = {b: osel.selective_pafi(budget=b, inner=optax.sgd(0.5)) for b in (10, 12)}


def _summary(base, budget=10, seed=1):
    tuned, state = _train(base, _PAFI[budget], seed=seed)
    return tuned, osel.make_summary(tuned, state)


# ------------------------------------------------------------------------------------------
# attach / detach


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_attach_then_detach_is_bit_exact_after_training(dtype):
    base = _params(dtype)
    tuned, summary = _summary(base)
    assert summary.leaves[0].dtype == np.dtype(dtype)
    h = osel.attach(base, summary)
    assert _bits(h.params) == _bits(tuned)  # only the selected entries changed in training
    restored = h.detach()
    assert _bits(restored) == _bits(base)
    assert [np.asarray(x).dtype for x in jax.tree.leaves(restored)] == [np.dtype(dtype)] * 3
    assert sum(leaf.values.size for leaf in h.saved.leaves) == summary.budget_used
    with pytest.raises(core.AdapterError, match="detached already"):
        h.detach(restored)


def _split(summary, parts=2):
    """Disjoint summaries: each leaf's entries dealt out in turn."""
    out = []
    for k in range(parts):
        leaves = [osel.SummaryLeaf(lf.key, lf.shape, lf.dtype, lf.indices[k::parts],
                                   lf.values[k::parts]) for lf in summary.leaves]
        leaves = [lf for lf in leaves if lf.indices.size]
        out.append(osel.SparseSummary(tuple(leaves), sum(lf.indices.size for lf in leaves),
                                      summary.method))
    return out


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_disjoint_attaches_detach_in_any_order(order):
    base = _params()
    tuned, summary = _summary(base)
    a, b = _split(summary)
    ha = osel.attach(base, a, label="A")
    hb = osel.attach(ha.params, b, label="B")
    assert _bits(hb.params) == _bits(tuned)
    first, second = (ha, hb) if order == (0, 1) else (hb, ha)
    mid = first.detach(hb.params)
    only_second = osel.attach(base, second.summary).params
    assert _bits(mid) == _bits(only_second)
    assert _bits(second.detach(mid)) == _bits(base)


def test_overlapping_attach_is_refused():
    base = _params()
    _, summary = _summary(base)
    h = osel.attach(base, summary, label="first")
    with pytest.raises(core.AdapterError, match="already changed by the attached summary first"):
        osel.attach(h.params, _split(summary)[0])
    after = osel.attach(h.detach(), _split(summary)[0])  # once detached, it attaches again
    assert after.attached


def test_attach_refuses_a_summary_of_another_model_naming_the_parameter():
    _, summary = _summary(_params())
    other = _params()
    other["dense"]["bias"] = jnp.zeros(9)
    with pytest.raises(ValueError,
                       match=r"\[.dense.\]\[.bias.\]\W+ shape \(8,\), the model.s \(9,\)"):
        osel.attach(other, summary)


# ------------------------------------------------------------------------------------------
# folders


def test_folder_round_trip_and_config(tmp_path):
    base = _params(jnp.bfloat16)
    tuned, summary = _summary(base)
    folder = osel.save_pretrained(summary, tmp_path / "a", base_model="org/tiny@rev1", base=base,
                                  hyperparameters={"budget": 10, "lr": 0.5}, budget=10)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "base", "summary"]
    cfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert cfg["method"] == "pafi" and cfg["budget"] == 10 and cfg["budget_used"] == 10
    assert cfg["base_model"] == {"id": "org/tiny", "revision": "rev1"}
    assert cfg["hyperparameters"] == {"budget": 10, "lr": 0.5}
    assert cfg["framework"] == "jax" and cfg["library_version"] == osel.__version__
    assert [p["name"] for p in cfg["parameters"]] == [lf.key for lf in summary.leaves]
    assert {p["dtype"] for p in cfg["parameters"]} == {"bfloat16"}
    read = osel.read_pretrained(folder, base)
    assert _bits(osel.apply_summary(base, read.summary)) == _bits(tuned)
    assert _bits(osel.apply_summary(tuned, read.base)) == _bits(base)
    with pytest.raises(FileExistsError):
        osel.save_pretrained(summary, folder)
    osel.save_pretrained(summary, folder, overwrite=True)  # replaces an adapter folder
    assert osel.read_pretrained(folder).base is None
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not an adapter folder"):
        osel.save_pretrained(summary, tmp_path / "other", overwrite=True)


def _tamper_config(folder, fn):
    p = os.path.join(folder, "adapter_config.json")
    cfg = json.loads(open(p).read())
    fn(cfg)
    open(p, "w").write(json.dumps(cfg))


def test_tampered_folder_is_refused(tmp_path):
    base = _params()
    _, summary = _summary(base)
    _, other = _summary(base, seed=7)  # same entries (PaFI), other values
    good = osel.save_pretrained(summary, tmp_path / "a", base=base)
    # a summary swapped for another one, well formed in itself
    swapped = osel.save_pretrained(summary, tmp_path / "b", base=base)
    osel.save_summary(os.path.join(swapped, "summary"), other, overwrite=True)
    with pytest.raises(core.AdapterError, match="does not match the config's digest"):
        osel.load_pretrained(swapped)
    # base values changed
    rebased = osel.save_pretrained(summary, tmp_path / "c", base=base)
    osel.save_summary(os.path.join(rebased, "base"), other, overwrite=True)
    with pytest.raises(core.AdapterError, match="base_digest"):
        osel.load_pretrained(rebased)
    # config edited: a parameter's shape
    shaped = osel.save_pretrained(summary, tmp_path / "d", base=base)
    _tamper_config(shaped, lambda c: c["parameters"][0].update(shape=[7, 8]))
    with pytest.raises(core.AdapterError, match="parameter"):
        osel.load_pretrained(shaped)
    # config not JSON, and oversized
    broken = osel.save_pretrained(summary, tmp_path / "e")
    open(os.path.join(broken, "adapter_config.json"), "w").write("{")
    with pytest.raises(core.AdapterError, match="not valid JSON"):
        osel.load_pretrained(broken)
    with open(os.path.join(broken, "adapter_config.json"), "wb") as f:
        f.truncate(core.MAX_CONFIG_BYTES + 1)
    with pytest.raises(core.AdapterError, match="bytes"):
        osel.load_pretrained(broken)
    # the summary files themselves are checked by load_summary
    corrupt = osel.save_pretrained(summary, tmp_path / "f")
    for root, _, files in os.walk(os.path.join(corrupt, "summary", "arrays")):
        for f in files:
            if root.endswith(".values") and f == "0":
                open(os.path.join(root, f), "wb").write(b"\0" * 3)
    with pytest.raises(osel.SummaryFormatError):
        osel.load_pretrained(corrupt)
    assert osel.load_pretrained(good).budget_used == summary.budget_used


# ------------------------------------------------------------------------------------------
# merging, against a dense NumPy reference


def _dense_reference(bases, summaries, weights, rule, budget):
    """Per leaf, dense float64 deltas (NaN where a summary has no entry), then the rule."""
    out = {}
    cands = []
    for key, base in bases.items():
        flat = np.asarray(base, np.float64).reshape(-1)
        d = np.full((len(summaries), flat.size), np.nan)
        for i, s in enumerate(summaries):
            for lf in s.leaves:
                if lf.key == key:
                    d[i, lf.indices] = weights[i] * (lf.values.astype(np.float64)
                                                     - flat[lf.indices])
        present = ~np.isnan(d)
        any_ = present.any(axis=0)
        z = np.where(present, d, 0.0)
        if rule == "sum":
            m = z.sum(0)
        elif rule == "mean":
            m = z.sum(0) / np.maximum(present.sum(0), 1)
        else:
            sign = np.sign(z.sum(0))
            agree = present & (np.sign(z) == sign) & (sign != 0)
            m = np.where(agree.sum(0) > 0, (z * agree).sum(0) / np.maximum(agree.sum(0), 1), 0)
        for j in np.flatnonzero(any_):
            cands.append((key, int(j), m[j]))
        out[key] = (flat, m)
    if budget is not None:
        order = sorted(range(len(cands)), key=lambda t: -abs(cands[t][2]))[:budget]
        cands = [cands[t] for t in sorted(order)]
    return {(k, j): out[k][0][j] + v for k, j, v in cands}


def _random_summaries(base_np, n, seed):
    rng = np.random.default_rng(seed)
    sums = []
    for _ in range(n):
        leaves = []
        for key, x in base_np.items():
            size = x.size
            idx = np.sort(rng.choice(size, size=rng.integers(1, size // 2), replace=False))
            vals = (x.reshape(-1)[idx] + rng.normal(size=idx.size)).astype(np.float32)
            leaves.append(osel.SummaryLeaf(key, x.shape, np.float32, idx.astype(np.int32), vals))
        sums.append(osel.SparseSummary(tuple(leaves), sum(lf.indices.size for lf in leaves),
                                       "pafi"))
    return sums


@pytest.mark.parametrize("rule", ["sum", "mean", "ties"])
@pytest.mark.parametrize("budget", [None, 25])
def test_merge_rules_match_numpy_reference(rule, budget):
    base = _params()
    base_np = {jax.tree_util.keystr(p): np.asarray(x)
               for p, x in jax.tree_util.tree_leaves_with_path(base)}
    sums = _random_summaries(base_np, 3, seed=hash((rule, budget)) % 1000)
    weights = [1.0, -0.5, 2.0]
    merged = osel.merge_summaries(sums, weights, rule=rule, budget=budget, base=base)
    ref = _dense_reference(base_np, sums, weights, rule, budget)
    got = {(lf.key, int(j)): v for lf in merged.leaves for j, v in zip(lf.indices, lf.values)}
    assert sorted(got) == sorted(ref)
    np.testing.assert_array_equal(np.array([got[k] for k in sorted(ref)]),
                                  np.array([ref[k] for k in sorted(ref)], np.float32))
    assert merged.budget_used == (budget if budget is not None else len(ref))
    assert merged.method == f"merge-{rule}"


def test_merge_bfloat16_rounds_once_and_refuses_other_bases(tmp_path):
    base = _params(jnp.bfloat16)
    _, s = _summary(base)
    one = osel.merge_summaries([s], base=base)  # a single summary merges to itself
    assert [lf.values.tobytes() for lf in one.leaves] == [lf.values.tobytes() for lf in s.leaves]
    assert one.leaves[0].values.dtype == ml_dtypes.bfloat16
    other_base = jax.tree.map(lambda x: x + jnp.asarray(1, x.dtype), base)
    a = osel.save_pretrained(s, tmp_path / "a", base=base)
    b = osel.save_pretrained(s, tmp_path / "b", base=other_base)
    with pytest.raises(core.AdapterError, match="disagree on the base value"):
        osel.merge_summaries([a, b])
    with pytest.raises(core.AdapterError, match="differ from base="):
        osel.merge_summaries([a], base=other_base)
    with pytest.raises(core.AdapterError, match="no base values"):
        osel.merge_summaries([s])
    c = osel.save_pretrained(s, tmp_path / "c", base=base, base_model="org/x")
    d = osel.save_pretrained(s, tmp_path / "d", base=base, base_model="org/y")
    with pytest.raises(core.AdapterError, match="different base models"):
        osel.merge_summaries([c, d])
    with pytest.raises(core.AdapterError, match="rule must be one of"):
        osel.merge_summaries([a], rule="max")
    with pytest.raises(core.AdapterError, match="weights must be 1 finite"):
        osel.merge_summaries([a], [1.0, 2.0])


def test_merge_folders_and_cli(tmp_path, capsys):
    base = _params()
    _, s1 = _summary(base, budget=10)
    _, s2 = _summary(base, budget=12, seed=3)
    a = osel.save_pretrained(s1, tmp_path / "a", base=base, base_model="org/tiny")
    b = osel.save_pretrained(s2, tmp_path / "b", base=base, base_model="org/tiny")
    out = merge_folders(tmp_path / "m", [a, b], [1.0, 0.5], rule="ties", budget=15)
    want = osel.merge_summaries([s1, s2], [1.0, 0.5], rule="ties", budget=15, base=base)
    got = osel.read_pretrained(out)
    assert _bits(osel.apply_summary(base, got.summary)) == _bits(osel.apply_summary(base, want))
    assert got.config["base_model"]["id"] == "org/tiny" and got.config["budget"] == 15
    assert cli_main(["merge", str(tmp_path / "m2"), a, b, "--weights", "1,0.5", "--rule",
                     "ties", "--budget", "15"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _bits(osel.apply_summary(base, osel.load_pretrained(tmp_path / "m2"))) == _bits(
        osel.apply_summary(base, want))
    assert cli_main(["inspect", str(tmp_path / "m2")]) == 0
    text = capsys.readouterr().out
    assert "method: merge-ties" in text
    assert f"entries: {want.budget_used} of budget 15" in text
    assert "base model: org/tiny" in text and "(verified)" in text
    assert "['dense']['kernel']" in text
    assert cli_main(["inspect", "--json", a]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["budget_used"] == 10 and d["digest_verified"] and d["base_values"]
    osel.save_summary(tmp_path / "plain", s1)
    assert cli_main(["inspect", str(tmp_path / "plain")]) == 0
    assert "JAX summary folder" in capsys.readouterr().out
    # bad input: clear errors, exit status 2
    assert cli_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "nothing at" in capsys.readouterr().err
    assert cli_main(["merge", str(tmp_path / "m3"), a, b, "--weights", "1"]) == 2
    assert "--weights has 1 numbers for 2 inputs" in capsys.readouterr().err
    assert cli_main(["merge", str(tmp_path / "m2"), a, b]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["merge", str(tmp_path / "m4"), a]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["merge", "--help"])
    assert e.value.code == 0 and "--rule" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["merge", "o", a, b, "--weights", "x"])
    assert e.value.code == 2 and "comma-separated" in capsys.readouterr().err
