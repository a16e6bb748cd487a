"""benchmarks/memory.py runs each case in its own process and writes ratios and targets."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

pytestmark = pytest.mark.side  # every case runs in its own benchmark process (tests/conftest.py)


@pytest.mark.slow
def test_memory_benchmark_tiny_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--sizes", "tiny", "--cases",
         "adamw,lora,id3_compact,id3_stream_rows", "--steps", "2", "--no-jax", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "memory.json").read_text())
    assert result["commit"] and result["malloc"].startswith("MALLOC_MMAP_THRESHOLD_")
    rows = {row["case"]: row for row in result["sizes"]["tiny"]}
    assert set(rows) == {"adamw", "lora", "id3_compact", "id3_stream_rows"}
    for case, row in rows.items():
        assert "error" not in row, row
        assert row["hwm_reset"] and row["extra_peak"] > 0 and row["step_s"] > 0, case
        assert row["peak_over_adamw"] > 0 and row["peak_over_lora"] > 0
        assert row["step_cpu_s"] > 0 and row["cpu_over_adamw"] > 0 and row["load"] >= 0
    assert rows["adamw"]["peak_over_adamw"] == pytest.approx(1.0)
    # the optimizer state: AdamW two moments per parameter, ID3 O(budget)
    n = rows["adamw"]["params"]
    assert rows["adamw"]["state_bytes"] >= 2 * 2 * n
    assert 0 < rows["id3_stream_rows"]["state_bytes"] < n
    # streamed, the LM head and embedding in row blocks (one each at this size): the same run
    assert rows["id3_stream_rows"]["budget_used"] == rows["id3_compact"]["budget_used"] > 0
    assert rows["id3_stream_rows"]["losses"] == rows["id3_compact"]["losses"]
    md = (tmp_path / "memory.md").read_text()
    assert "| ID3 0.5%, compact, stream_grads=True + chunk_weight_grads |" in md
    assert "target <= 1.35x" in md
    assert "| step CPU |" in md and "step CPU time = " in md


def test_adamw_ratios_are_to_the_best_adamw_form_per_measure():
    """Each AdamW ratio divides by the best AdamW form measured for that column (#26)."""
    from benchmarks.memory import _ratios

    def row(case, peak, step):
        return {"case": case, "extra_peak": peak, "step_s": step, "step_cpu_s": step, "state_bytes": 8}

    rows = [row("adamw", 10, 2.0), row("adamw_fused", 12, 1.0), row("id3_compact", 6, 3.0)]
    _ratios(rows)
    r = rows[2]
    assert r["peak_over_adamw"] == pytest.approx(0.6)  # to the for-loop form's lower peak
    assert r["step_over_adamw"] == pytest.approx(3.0)  # to the fused form's faster step
    assert r["adamw_best"]["extra_peak"] == "adamw" and r["adamw_best"]["step_s"] == "adamw_fused"
