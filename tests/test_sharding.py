"""Sharded JAX selection over two processes, and the sharded example and scaling benchmark on
8 simulated CPU devices, equal to the single-device run (in-process checks on 8 devices:
``tests/test_sharding_8_devices.py``).

These run in fresh interpreters because the device count is fixed when jax is first imported,
and the rest of the test suite shares this process with one device.
"""

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import optax_selective as osel
from tests._dist_workers import common, jax_multiprocess

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
@pytest.mark.eight_devices  # in-process in the 8-device child pytest (tests/conftest.py)
def test_sharded_nnx_example_trains_within_budget(capsys, monkeypatch):
    script = ROOT / "examples" / "sharded_id3.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "8", "--budget", "100"])
    runpy.run_path(str(script), run_name="__main__")  # as `python examples/sharded_id3.py`
    out = capsys.readouterr().out
    assert "devices: 8" in out and "P(None, 'model')" in out, out
    assert "entries trained: 100 of budget 100" in out, out


@pytest.mark.side
@pytest.mark.slow
def test_scaling_benchmark_reports_1_2_4_8_devices(tmp_path):
    out = tmp_path / "scaling.json"
    args = ["--entries", "8192", "--steps", "2", "--modes", "explicit", "--out", str(out)]
    proc = _run_with_8_devices("-m", "benchmarks.scaling", *args)  # explicit mode only, to keep the test short
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    written = json.loads(out.read_text())
    assert set(written["run"]) >= {"commit", "dirty", "date"}
    rows = written["rows"]
    assert [(r["mode"], r["devices"]) for r in rows] == [("explicit", n) for n in (1, 2, 4, 8)]
    # Explicit mode selects with reductions only: no collective moves more than a scalar.
    assert all(r["largest_collective"] <= 1 for r in rows), rows
    assert all(r["median_ms"] > 0 and r["entries"] == 8192 for r in rows)


# Two JAX processes on localhost (gloo CPU collectives) select what one device selects.
#
# Each process holds 2 simulated CPU devices; the mesh spans all 4. Both processes must hold
# identical global masks at every step, equal bit for bit to a single-process run, and together
# write one orbax checkpoint (params and optimizer state) and one summary, both equal to the
# single-process ones.

NUM_PROCESSES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, names: str) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._dist_workers.jax_multiprocess",
                str(i),
                str(NUM_PROCESSES),
                str(port),
                str(out_dir),
                names,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-6000:]}"


def _reference(name: str) -> tuple[dict, dict, object]:
    """The same training on this process's single device, keyed like the workers' files."""
    params, targets = common.make_params()
    tx = common.optimizers()[name]
    state = tx.init(params)
    step = jax.jit(common.make_step(tx))
    out = {}

    def record(t, tree):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            out[f"{t}{jax.tree_util.keystr(path)}"] = np.asarray(x)

    record("mask0", osel.selected_mask(state))
    for t in range(common.STEPS):
        params, state = step(params, state, targets)
        record(f"mask{t + 1}", osel.selected_mask(state))
    record("params", params)
    return out, params, state


MULTIPROCESS_OPTIMIZERS = [jax_multiprocess.OPTIMIZER, "id3_wrapper_adam"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """One launch of the two processes trains every optimizer the test below checks."""
    out = tmp_path_factory.mktemp("two_processes")
    _launch(out, ",".join(MULTIPROCESS_OPTIMIZERS))
    return out


@pytest.mark.side
@pytest.mark.slow
@pytest.mark.parametrize("name", MULTIPROCESS_OPTIMIZERS, ids=["dense", "compact"])
def test_two_processes_select_identically_and_checkpoint_once(two_process_runs, name):
    """Dense inner state, and compact state (its eager init must not read the global masks on
    the host: a multi-process array is not fully addressable)."""
    tmp_path = two_process_runs / name
    ranks = [dict(np.load(tmp_path / f"rank{i}.npz")) for i in range(NUM_PROCESSES)]
    want, params, state = _reference(name)
    for i, got in enumerate(ranks):
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            assert got[key].tobytes() == want[key].tobytes(), f"process {i}: {key} differs"
    final_mask = {k: v for k, v in want.items() if k.startswith(f"mask{common.STEPS}")}
    assert sum(int(v.sum()) for v in final_mask.values()) == common.BUDGET

    import orbax.checkpoint as ocp

    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": params, "opt_state": state}
    restored = ocp.StandardCheckpointer().restore(
        tmp_path / "ckpt",
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), target),
    )
    common.assert_trees_identical(restored, target, "checkpoint")

    summary = osel.load_summary(tmp_path / "summary")
    expected = osel.make_summary(params, state)
    assert summary.budget_used == expected.budget_used == common.BUDGET
    assert summary.method == expected.method
    assert [leaf.key for leaf in summary.leaves] == [leaf.key for leaf in expected.leaves]
    for got, ref in zip(summary.leaves, expected.leaves):
        assert got.shape == ref.shape and got.dtype == ref.dtype, got.key
        assert got.indices.tobytes() == ref.indices.tobytes(), got.key
        assert got.values.tobytes() == ref.values.tobytes(), got.key
