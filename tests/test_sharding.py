"""Sharded JAX selection on 8 simulated CPU devices, equal to the single-device run.

The checks live in ``tests/_dist_workers/sharded_suite.py``; they run here in a fresh
interpreter because the device count is fixed when jax is first imported, and the rest of
the test suite shares this process with one device.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sharded_suite_on_8_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "_dist_workers" / "sharded_suite.py"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"sharded suite failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    )
