"""benchmarks/memory_jax.py --measure: real training steps of the example Flax Llama, peak RSS."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks import memory_jax
from examples import llm_flax


def test_remat_gives_the_same_loss_and_gradients():
    """Gradient checkpointing (used by the measured mode) recomputes, it does not change values."""
    c = llm_flax.PRESETS["tiny"]
    tokens = np.random.default_rng(0).integers(0, c.vocab, (1, 17)).astype(np.int32)
    mesh = jax.make_mesh((1,), (llm_flax.FSDP,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    results = []
    for remat in (False, True):
        with jax.set_mesh(mesh), nnx.use_eager_sharding(True):
            model = llm_flax.Llama(c, rngs=nnx.Rngs(0), remat=remat)

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(tokens[:, :-1]), tokens[:, 1:]).mean()

        with jax.set_mesh(mesh):
            results.append(nnx.jit(nnx.value_and_grad(loss_fn))(model))
    (l0, g0), (l1, g1) = results
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        # bf16: recomputation may round differently per entry, not in the whole
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b) + 1e-6, (np.linalg.norm(a - b), np.linalg.norm(b))


def test_measured_tx_names_the_cases():
    assert memory_jax.MEASURED_CASES == ("optax.adamw", "id3 compact")
    with pytest.raises(ValueError, match=r"case='lora' .*choose from optax.adamw, id3 compact"):
        memory_jax.measured_tx("lora", 10)


def test_measure_case_refuses_an_analysis_only_preset():
    with pytest.raises(ValueError, match=r"preset='7b'.*drop --measure"):
        memory_jax.measure_case("optax.adamw", "7b", steps=1)


@pytest.mark.side
@pytest.mark.slow
def test_measure_mode_runs_each_case_in_its_own_process_and_writes_ratios(tmp_path):
    out = memory_jax.main(["--measure", "--presets", "tiny", "--steps", "2", "--seq", "16", "--out", str(tmp_path)])
    rows = out["rows"]
    assert [r["case"] for r in rows] == ["optax.adamw", "id3 compact"], rows
    adamw, id3 = rows
    for r in rows:
        assert "error" not in r, r
        assert r["params"] == 158_016 and r["seq"] == 16 and r["remat"] is True
        assert r["hwm_reset"] and r["extra_peak"] > 0 and r["step_s"] > 0
        assert len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))
    # dense AdamW: two bf16 moments per parameter (+ count); ID3 compact: O(budget) state
    assert adamw["state_bytes"] >= 2 * 2 * adamw["params"]
    assert id3["state_bytes"] < adamw["state_bytes"] / 2
    k_t = -(-id3["budget"] // memory_jax.MAX_STEPS)  # ID3 unmasks about budget / max_steps a step
    assert 2 * (k_t - 1) <= id3["budget_used"] <= 2 * k_t, id3["budget_used"]
    assert adamw["peak_over_adamw"] == 1.0 and id3["state_over_adamw"] == id3["state_bytes"] / adamw["state_bytes"]
    saved = json.loads((tmp_path / "memory_jax_measured.json").read_text())
    assert saved["run"]["commit"] and saved["command"].startswith("python -m benchmarks.memory_jax --measure")
    md = (tmp_path / "memory_jax_measured.md").read_text()
    assert "| tiny | 0.2M | id3 compact |" in md and "Command: `python -m benchmarks.memory_jax --measure" in md
