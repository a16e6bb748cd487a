"""examples/llm_flax.py at the tiny preset: trains on 8 simulated CPU devices, offline."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_llama_trains_sharded_and_its_summary_round_trips():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "llm_flax.py"), "--preset", "tiny", "--steps", "30", "--texts", "2000"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert "devices 8" in out and "P('fsdp', None)" in out, out
    assert "summary reload gives identical logits: True" in out, out
    m = re.search(r"loss ([\d.]+) -> ([\d.]+); budget used (\d+) of (\d+); optimizer state ([\d.]+) MiB; peak RSS (\d+) MiB", out)
    assert m, out
    first, last, used, budget = float(m[1]), float(m[2]), int(m[3]), int(m[4])
    assert last < first - 0.2, (first, last)  # it learns the byte statistics
    assert used == budget
