"""benchmarks/: the suite runs end to end (tiny sizes) and writes what it promises; EntryAdam
(benchmarks/quality/ablation.py) does per-entry Adam bias correction."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.quality.ablation import EntryAdam, late_step_factor

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.side
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


@pytest.mark.side
def test_gpu_script_parses_and_documents_its_command():
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "--budget-seconds" in r.stdout
    assert "python -m benchmarks.gpu" in r.stdout


PATH_EDIT = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\[.*\])?\s*\+?=")
RUN_BY_PATH = re.compile(r"sys\.executable,\s*(str\()?(os\.path\.abspath\()?__file__")


def test_benchmarks_run_as_modules_without_path_hacks_and_install_the_reference_once():
    """No benchmark edits ``sys.path`` or runs itself by file path, and only
    ``benchmarks/runs.py`` installs the 0.4 reference with pip (the tests use it too, through
    the ``reference_0_4`` fixture)."""
    offenders, installers = [], []
    for folder in ("benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            rel = path.relative_to(ROOT).as_posix()
            if folder == "benchmarks" and (PATH_EDIT.search(text) or RUN_BY_PATH.search(text)):
                offenders.append(rel)
            if path != Path(__file__).resolve() and '"--target"' in text:  # pip install --target
                installers.append(rel)
    assert offenders == []
    assert installers == ["benchmarks/runs.py"]


def test_results_record_the_commit_they_ran_on(tmp_path):
    from benchmarks.runs import run_info, run_line, write_json

    written = write_json(tmp_path / "sub" / "r.json", {"rows": [1]})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == written
    assert written["rows"] == [1] and set(written["run"]) == {"commit", "dirty", "date", "python"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI); an unpacked archive records None
        assert written["run"]["commit"] == head.stdout.strip()
        assert isinstance(written["run"]["dirty"], bool)
        assert head.stdout.strip() in run_line(written["run"])
    else:
        assert written["run"]["commit"] is None
    # An existing record is kept (a resumed run keeps the commit it started on).
    assert write_json(tmp_path / "r2.json", {"run": {"commit": "abc"}})["run"] == {"commit": "abc"}
    assert run_info(tmp_path)["commit"] is None  # not a git checkout


def test_reference_process_imports_the_reference_not_ours(tmp_path):
    """A fake folder standing in for the installed reference: a process set up with
    reference_process imports its selective_optimizers and this checkout's benchmarks."""
    from benchmarks.runs import reference_process

    fake = tmp_path / "selective_optimizers"
    fake.mkdir()
    (fake / "__init__.py").write_text("REFERENCE = True\n")
    code = ("import selective_optimizers as s, benchmarks.runs as r;"
            "print(s.__file__); print(r.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         **reference_process(tmp_path))
    assert out.returncode == 0, out.stderr
    ref, ours = out.stdout.split()
    assert Path(ref) == fake / "__init__.py"
    assert Path(ours) == ROOT / "benchmarks" / "runs.py"


def test_torch_rows_time_dense_and_compact_bridge_and_count_state():
    pytest.importorskip("torch")
    from benchmarks import torch_rows

    t = torch_rows.run("64x2", quick=True, repeats=2, reference=False)
    (row,) = t["sizes"]
    n, b = row["params"], row["budget"]
    assert row["dense_adamw_ms"] > 0 and row["bridge_id3_ms"] > 0 and row["compact_id3_ms"] > 0
    assert 8 * n <= row["dense_state_bytes"] <= 8 * n + 64  # AdamW: two moments per entry + steps
    assert row["bridge_state_bytes"] >= 8 * n  # dense bridge: moments + masks
    assert n <= row["compact_state_bytes"] <= n + 40 * b  # small model: masks + O(budget) slots
    assert row["bridge_compile_s"] > 0 and row["bridge_xla_compiles"] == 1  # compiled once
    md = torch_rows.markdown(t)
    assert "| 0.01M |" in md and "not run" in md and "ID3 compile s (XLA compiles)" in md


def test_selection_pass_benchmark_compares_both_forms_on_the_same_entries(capsys):
    from benchmarks.selection_pass import main

    (row,) = main(["--sizes", "256x2", "--rounds", "1"])
    assert row["same_entries"] is True and row["entries"] == 2 * (256 * 256 + 256)
    assert row["plain_ms"] > 0 and row["grouped_ms"] > 0
    assert "| grouped / plain |" in capsys.readouterr().out


# EntryAdam (benchmarks/quality/ablation.py): per-entry Adam bias correction.

def test_entry_adam_is_adam_when_every_entry_starts_at_step_one():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = EntryAdam([a], lr=0.01)
    opt_b = torch.optim.Adam([b], lr=0.01)
    for _ in range(6):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_late_entry_counts_its_own_steps():
    lr, g = 0.1, 0.5
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    ours, adam = EntryAdam([p], lr=lr, eps=1e-12), torch.optim.Adam([q], lr=lr, eps=1e-12)
    for t in range(1, 5):  # entry 0 has a gradient from step 1, entry 1 only at step 4
        grad = torch.tensor([1.0, g if t == 4 else 0.0])
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        adam.step()
        if t < 4:
            assert p[1].item() == 0.0 and q[1].item() == 0.0  # not started: never moved
    # its first own step: m_hat = g, v_hat = g^2, so the step is exactly lr
    assert p[1].item() == pytest.approx(-lr, rel=1e-4)
    # Adam with the global count t = 4: m_hat = 0.1 g / (1 - 0.9^4), v_hat = 0.001 g^2 / (1 - 0.999^4)
    hand = lr * (0.1 * g / (1 - 0.9**4)) / math.sqrt(0.001 * g * g / (1 - 0.999**4))
    assert q[1].item() == pytest.approx(-hand, rel=1e-4)
    assert hand == pytest.approx(lr * late_step_factor(4, 1), rel=1e-9)
    assert abs(hand - lr) > 0.1 * lr  # the two really differ
    assert p[0].item() == pytest.approx(q[0].item(), rel=1e-4)  # entry 0: plain Adam


def test_entry_adam_under_the_selective_wrapper_keeps_the_budget():
    from selective_optimizers.wrap import get_selective_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = get_selective_optimizer(EntryAdam, "id3")(
        params=model.parameters(), lr=0.05, budget=10, max_steps=5, eps=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    for _ in range(8):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    assert 0 < changed <= 10 and opt.get_budget_used() == 10


def test_id3_diagnosis_sorts_bert_parameters_by_kind():
    from benchmarks.quality.id3_diagnosis import kind

    cases = {
        ("bert.embeddings.word_embeddings.weight", (30522, 384)): "word embeddings",
        ("bert.embeddings.position_embeddings.weight", (512, 384)): "position/type embeddings",
        ("bert.embeddings.LayerNorm.weight", (384,)): "LayerNorm",
        ("bert.encoder.layer.0.attention.self.query.weight", (384, 384)): "attention weights",
        ("bert.encoder.layer.0.attention.self.query.bias", (384,)): "biases",
        ("bert.encoder.layer.0.intermediate.dense.weight", (1536, 384)): "feed-forward weights",
        ("bert.pooler.dense.weight", (384, 384)): "pooler weight",
        ("bert.pooler.dense.bias", (384,)): "pooler bias",
    }
    assert {k: kind(*k) for k in cases} == cases
