"""examples/llm_torch.py at the tiny preset, offline: the loss falls, the summary round-trips."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

pytest.importorskip("transformers")

pytestmark = pytest.mark.side  # end-to-end runs of the example (tests/conftest.py)


def check(out):
    assert out["loss_last"] < out["loss_first"] - 0.5
    assert out["eval_after"] < out["eval_before"]
    assert out["identical"]  # the reloaded summary gives the trained logits exactly
    assert out["budget_used"] == out["budget"]
    assert 0 < out["state_bytes"] < out["params"]  # O(budget): no byte per parameter
    assert out["line"].startswith("RESULT loss=") and "peak_rss=" in out["line"]


def test_tiny_loop_streams_and_round_trips(tmp_path):
    from examples.llm_torch import main

    out = main(["--preset", "tiny", "--steps", "16", "--train-blocks", "200", "--quiet",
                "--summary", str(tmp_path / "s.pt")])
    check(out)
    assert (tmp_path / "s.pt").stat().st_size == out["summary_bytes"]


@pytest.mark.slow
def test_tiny_trainer_path():
    from examples.llm_torch import main

    check(main(["--preset", "tiny", "--steps", "16", "--train-blocks", "200", "--quiet",
                "--trainer"]))


def test_help_runs_from_any_directory(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "llm_torch.py"
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "--preset" in out.stdout and "1b" in out.stdout
