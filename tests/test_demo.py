"""examples/demo.py runs end to end (few steps), its reload check is real, and it stays out of
the library (whose core needs neither scikit-learn nor tqdm)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import optax_selective as osel
from examples import demo


@pytest.mark.side
@pytest.mark.slow
def test_demo_main_runs_and_reproduces_exactly(tmp_path, capsys):
    out = tmp_path / "out"
    results = demo.main(
        [
            "--steps",
            "20",
            "--pretrain-steps",
            "30",
            "--budget",
            "100",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out

    assert [r.method for r in results] == list(demo.METHODS)
    by = {r.method: r for r in results}
    num_params = 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert by["id3"].budget_used == 100  # max_steps = 10 <= 20 steps: budget fully spent
    assert by["pafi"].budget_used == 100
    assert by["bitfit"].budget_used == 100  # 138 bias entries available
    assert by["fish"].budget_used == 100  # fish_steps = 1: fixed at the first step
    assert by["random"].budget_used == 100
    assert by["fft"].budget_used == num_params
    for r in results:
        assert r.params_identical
        assert r.reloaded_accuracy == r.accuracy
        assert 0.0 <= r.accuracy <= 1.0
        assert r.ms_per_step > 0
        assert os.path.isdir(r.summary_path) and r.summary_path.startswith(str(out))
        assert r.summary_bytes == demo.dir_bytes(r.summary_path) > 0
        assert r.opt_state_bytes > 0
        loaded = osel.load_summary(r.summary_path)
        assert loaded.method == r.method and loaded.budget_used == r.budget_used
    # The summary of 100 entries is far smaller than the full fine-tuning one.
    assert by["id3"].summary_bytes < by["fft"].summary_bytes / 4

    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method  acc 5-9"))
    for offset, r in enumerate(results, start=2):
        cells = lines[header + offset].split()
        assert cells[0] == r.method
        assert cells[1] == f"{100 * r.accuracy:.1f}%"
        assert cells[3] == str(r.budget_used)
    reload_header = next(i for i, line in enumerate(lines) if "acc from reloaded summary" in line)
    for offset, r in enumerate(results, start=2):
        cells = lines[reload_header + offset].split()
        assert cells == [r.method, f"{100 * r.accuracy:.2f}%", f"{100 * r.accuracy:.2f}%", "yes"]


@pytest.mark.side
def test_reload_check_catches_a_wrong_summary(tmp_path):
    tasks = demo.load_tasks(0)
    pretrained = demo.pretrain(tasks, hidden=8, steps=5, seed=0, progress=False)
    result, tuned = demo.finetune(
        "pafi",
        pretrained,
        tasks,
        budget=20,
        steps=5,
        lr=0.1,
        weight_decay=0.0,
        out=str(tmp_path),
        progress=False,
    )
    demo.reload(result, pretrained, tuned, tasks)
    assert result.params_identical

    summary = osel.load_summary(result.summary_path)
    leaf = summary.leaves[0]
    values = leaf.values.copy()
    values[0] = values[0] + np.float32(1.0)
    bad = osel.SparseSummary(
        (osel.SummaryLeaf(leaf.key, leaf.shape, leaf.dtype, leaf.indices, values),)
        + summary.leaves[1:],
        summary.budget_used,
        summary.method,
    )
    osel.save_summary(result.summary_path, bad, overwrite=True)
    demo.reload(result, pretrained, tuned, tasks)
    assert not result.params_identical
    assert demo.format_reload_table([result]).splitlines()[-1].split()[-1] == "NO"


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--methods", "id3,lora"])
    assert e.value.code == 2
    assert "--methods got 'id3,lora'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--budget", "0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err
    assert demo.parse_args(["--methods", "FFT, id3,fft"]).methods == ("fft", "id3")


@pytest.mark.side
def test_module_help():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(demo.__file__))),
    )
    assert done.returncode == 0, done.stderr
    for option in ("--methods", "--budget", "--steps", "--out", "--help"):
        assert option in done.stdout


@pytest.mark.side
def test_library_imports_without_the_demos_dependencies():
    """Every module of the three packages imports with scikit-learn and tqdm made unimportable,
    and neither is a core dependency: they belong to the ``examples`` extra."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    core = " ".join(project["dependencies"])
    assert "tqdm" not in core and "scikit-learn" not in core, core
    assert {"tqdm", "scikit-learn"} <= {
        d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["examples"]
    }
    code = """
import importlib, pkgutil, sys
for blocked in ("sklearn", "tqdm"):
    sys.modules[blocked] = None  # any import of it now raises ImportError
for package in ("optax_selective", "torch_bridge", "selective_optimizers"):
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name != "torch_bridge.trainer":  # the Trainer callback: needs transformers
            importlib.import_module(info.name)     # (the hf extra), which itself needs tqdm
print("ok")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=root
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
