"""benchmarks/memory_jax.py: compiled-memory rows the torch memory benchmark imports."""

import json

import jax.numpy as jnp

from benchmarks import memory_jax


def test_llama_shapes_count_the_200m_config():
    params = memory_jax.llama_shapes("200m")
    assert memory_jax.count(params) == 200_827_904  # hidden 1024, 12 layers, untied head
    assert params["embed"].dtype == jnp.bfloat16 and params["layers"][0]["attn"]["k"].shape == (1024, 256)


def test_jax_rows_and_main_write_a_table(tmp_path):
    rows = memory_jax.jax_rows("tiny")
    assert [r["case"] for r in rows] == ["optax.adamw", "id3 compact", "pafi compact"]
    for r in rows:
        assert {"case", "peak_bytes", "temp_bytes", "state_bytes", "step_s", "ratio"} <= set(r)
        assert r["step_s"] is None and r["peak_bytes"] > 0
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["state_bytes"] < rows[0]["state_bytes"]  # O(budget) + mask vs two moments
    out = memory_jax.main(["--presets", "tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "memory_jax.json").read_text())
    assert saved["rows"][0]["case"] == "optax.adamw" and saved["command"].startswith("python -m benchmarks.memory_jax")
    assert "| tiny bfloat16 |" in (tmp_path / "memory_jax.md").read_text()
    assert len(out["targets"]) == 2
