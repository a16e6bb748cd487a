"""Sharded JAX selection on 8 simulated CPU devices, equal to the single-device run.

The checks live in ``tests/_dist_workers/sharded_suite.py``; they run here in a fresh
interpreter because the device count is fixed when jax is first imported, and the rest of
the test suite shares this process with one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_with_8_devices(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    flag = "--xla_force_host_platform_device_count=8"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_sharded_suite_on_8_cpu_devices():
    suite = ROOT / "tests" / "_dist_workers" / "sharded_suite.py"
    proc = _run_with_8_devices("-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite))
    assert proc.returncode == 0, (
        f"sharded suite failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    )


@pytest.mark.slow
def test_sharded_nnx_example_trains_within_budget():
    proc = _run_with_8_devices(
        str(ROOT / "examples" / "sharded_id3.py"), "--steps", "8", "--budget", "100"
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "devices: 8" in proc.stdout and "P(None, 'model')" in proc.stdout, proc.stdout
    assert "entries trained: 100 of budget 100" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_scaling_benchmark_reports_1_2_4_8_devices(tmp_path):
    out = tmp_path / "scaling.json"
    bench = str(ROOT / "benchmarks" / "scaling.py")
    args = ["--entries", "8192", "--steps", "2", "--modes", "explicit", "--out", str(out)]
    proc = _run_with_8_devices(bench, *args)  # explicit mode only, to keep the test short
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["devices"]) for r in rows] == [("explicit", n) for n in (1, 2, 4, 8)]
    # Explicit mode selects with reductions only: no collective moves more than a scalar.
    assert all(r["largest_collective"] <= 1 for r in rows), rows
    assert all(r["median_ms"] > 0 and r["entries"] == 8192 for r in rows)
