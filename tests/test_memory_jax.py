"""benchmarks/memory_jax.py: compiled-memory rows the torch memory benchmark imports."""

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common, memory_jax


def test_llama_shapes_count_the_200m_config():
    params = memory_jax.llama_shapes("200m")
    assert memory_jax.count(params) == 200_827_904  # hidden 1024, 12 layers, untied head
    assert params["embed"].dtype == jnp.bfloat16 and params["layers"][0]["attn"]["k"].shape == (1024, 256)


@pytest.fixture(scope="module")
def tiny_rows():
    return memory_jax.jax_rows("tiny")  # compiled once for the tests below


def test_jax_rows_and_main_write_a_table(tmp_path, tiny_rows, monkeypatch):
    rows = tiny_rows
    assert [r["case"] for r in rows] == ["optax.adamw", "id3 compact", "pafi compact"]
    for r in rows:
        assert {"case", "peak_bytes", "temp_bytes", "state_bytes", "step_s", "ratio"} <= set(r)
        assert r["step_s"] is None and r["peak_bytes"] > 0
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["state_bytes"] < rows[0]["state_bytes"]  # O(budget) + mask vs two moments
    # main's own run in one layout (the layouts are checked with tiny_rows): a third of the compiles
    monkeypatch.setattr(common, "STEP_LAYOUTS", {"psg/ps": common.STEP_LAYOUTS["psg/ps"]})
    out = memory_jax.main(["--presets", "tiny", "--trees", "flat", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "memory_jax.json").read_text())
    assert saved["rows"][0]["case"] == "optax.adamw" and saved["command"].startswith("python -m benchmarks.memory_jax")
    md = (tmp_path / "memory_jax.md").read_text()
    assert "| tiny bfloat16 (0.2M) | flat (21 leaves) | optax.adamw | psg/ps |" in md
    assert len(out["targets"]) == 2


def test_every_case_is_reported_in_its_best_layout(tiny_rows):
    """The baseline is not handicapped by the argument order: optax.adamw compiles with
    temporaries as step(grads, state, params) and without as step(params, state, grads)
    (#26), and each row reports the layout with its lowest peak."""
    rows = tiny_rows
    for r in rows:
        by = r["peak_by_layout"]
        assert set(by) == set(common.STEP_LAYOUTS)
        assert r["peak_bytes"] == min(by.values()) == by[r["layout"]]
    adamw = rows[0]
    assert adamw["peak_by_layout"]["psg/ps"] < adamw["peak_by_layout"]["gsp/sp"]
    assert adamw["layout"] != "gsp/sp" and all(r["ratio"] == r["peak_bytes"] / adamw["peak_bytes"] for r in rows)


def test_flat_tree_holds_the_nested_trees_leaves():
    nested, flat = memory_jax.llama_shapes("200m"), memory_jax.flat_shapes("200m")
    assert len(flat) == len(jax.tree.leaves(nested)) == 111
    assert memory_jax.count(flat) == memory_jax.count(nested)
    assert "layers.0.attn.q" in flat and flat["layers.0.attn.q"].shape == (1024, 1024)


def test_make_step_runs_each_layout_with_the_same_result():
    import optax

    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    grads = {"w": jnp.full(4, 0.5), "b": jnp.full(2, -1.0)}
    tx = optax.adamw(0.1)
    outs = []
    for layout in common.STEP_LAYOUTS:
        step = common.make_step(tx, layout)
        g = jax.tree.map(jnp.copy, grads) if step.donates_grads else grads
        p, _ = step(g, tx.init(params), jax.tree.map(jnp.copy, params))
        outs.append(p)
    for p in outs[1:]:
        assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(outs[0])))
