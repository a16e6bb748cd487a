"""examples/llm_flax.py at the tiny preset: trains on 8 simulated CPU devices, offline.

It runs as ``python examples/llm_flax.py`` would, but in-process in the 8-device child
pytest (marker ``eight_devices``, ``tests/conftest.py``) rather than in an interpreter of
its own."""

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.eight_devices, pytest.mark.slow]


def test_tiny_llama_trains_sharded_and_its_summary_round_trips(capsys, monkeypatch):
    script = ROOT / "examples" / "llm_flax.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--preset", "tiny", "--steps", "30", "--texts", "2000"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "devices 8" in out and "P('fsdp', None)" in out, out
    assert "summary reload gives identical logits: True" in out, out
    m = re.search(r"loss ([\d.]+) -> ([\d.]+); budget used (\d+) of (\d+); optimizer state ([\d.]+) MiB; peak RSS (\d+) MiB", out)
    assert m, out
    first, last, used, budget = float(m[1]), float(m[2]), int(m[3]), int(m[4])
    assert last < first - 0.2, (first, last)  # it learns the byte statistics
    assert used == budget
