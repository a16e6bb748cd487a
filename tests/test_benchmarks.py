"""The benchmark suite runs end to end (tiny sizes) and writes what it promises."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--sizes", "48x2,64x2,80x2", "--torch", "off", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [s["params"] for s in results["sizes"]] == [2 * (w * w + w) for w in (48, 64, 80)]
    for size in results["sizes"]:
        n, b, rows = size["params"], size["budget"], size["rows"]
        assert rows["optax.adamw (dense)"]["step_ratio"] == pytest.approx(1.0)
        for name, row in rows.items():
            assert row["step_ms"] > 0 and row["state_bytes"] > 0, name
            if "compact" in name:
                assert row["state_bytes"] <= n + 16 * b, (name, row["state_bytes"], n + 16 * b)
                assert row["budget_used"] <= b
        assert rows["id3 wrapper adamw, dense state"]["state_bytes"] > 8 * n
    md = (out / "results.md").read_text()
    assert "| id3 wrapper adamw, compact |" in md and "target <= 1.0x" in md
    assert (out / "results.png").stat().st_size > 10_000


def test_gpu_script_parses_and_documents_its_command():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "--budget-seconds" in r.stdout


def test_torch_rows_time_dense_and_compact_bridge_and_count_state():
    pytest.importorskip("torch")
    from benchmarks import torch_rows

    t = torch_rows.run("64x2", quick=True, repeats=2, reference=False)
    (row,) = t["sizes"]
    n, b = row["params"], row["budget"]
    assert row["dense_adamw_ms"] > 0 and row["bridge_id3_ms"] > 0 and row["compact_id3_ms"] > 0
    assert 8 * n <= row["dense_state_bytes"] <= 8 * n + 64  # AdamW: two moments per entry + steps
    assert row["bridge_state_bytes"] >= 8 * n  # dense bridge: moments + masks
    assert n <= row["compact_state_bytes"] <= n + 40 * b  # masks + O(budget) slots
    assert row["bridge_compile_s"] > 0 and row["bridge_xla_compiles"] == 1  # compiled once
    md = torch_rows.markdown(t)
    assert "| 0.01M |" in md and "not run" in md and "ID3 compile s (XLA compiles)" in md


def test_selection_pass_benchmark_compares_both_forms_on_the_same_entries(capsys):
    from benchmarks.selection_pass import main

    (row,) = main(["--sizes", "256x2", "--rounds", "1"])
    assert row["same_entries"] is True and row["entries"] == 2 * (256 * 256 + 256)
    assert row["plain_ms"] > 0 and row["grouped_ms"] > 0
    assert "| grouped / plain |" in capsys.readouterr().out
