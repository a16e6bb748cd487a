"""The long quality protocol (benchmarks/quality/long.py): dev-only picks, resume, reports."""

from __future__ import annotations

import json

import pytest

from benchmarks.quality import long as ql


def record(name: str, setting: dict, seed: int, dev: float, test: float,
           task: str = "t") -> dict:
    return {"key": ql.run_key(task, "torch", name, setting, seed), "task": task,
            "framework": "torch", "name": name, "setting": setting, "seed": seed,
            "dev_accuracy": dev, "test_accuracy": test, "wall_seconds": 1.0}


def test_pick_takes_the_best_dev_accuracy_never_test():
    # test accuracy prefers lr 1e-3, dev prefers 3e-3: dev wins
    trials = [({"lr": 1e-3}, 0.70), ({"lr": 3e-3}, 0.75)]
    assert ql.pick(trials) == {"lr": 3e-3}
    assert ql.pick([({"lr": 3e-3}, 0.7), ({"lr": 1e-3}, 0.7)]) == {"lr": 1e-3}  # tie: smaller
    with pytest.raises(ValueError, match="at least one"):
        ql.pick([])


def test_staged_grid_uses_dev_only_and_searches_eps_at_the_best_lr_and_horizon():
    spec = {"method": "id3", "label": "ID3", "defaults": {"eps": 1e-3},
            "stages": [{"lr": [1e-3, 3e-3], "horizon": [0.1, 1.0]}, {"eps": [1e-3, 0.1]}]}
    cfg = {**ql.SMOKE, "tasks": ["t"], "seeds": [0, 1]}
    dev_test = {(1e-3, 0.1): (0.60, 0.90), (1e-3, 1.0): (0.70, 0.50),
                (3e-3, 0.1): (0.65, 0.95), (3e-3, 1.0): (0.62, 0.40)}
    runs = [record("id3", {"eps": 1e-3, "lr": lr, "horizon": h}, 0, d, t)
            for (lr, h), (d, t) in dev_test.items()]
    proto = ql.Protocol(cfg, {"id3": spec}, None, dry=True,
                        done={r["key"]: r for r in runs})
    # the eps stage runs at the dev-best (lr 1e-3, horizon 1.0), not the test-best
    assert proto.tune("t", "id3") is None and proto.planned == 1
    runs.append(record("id3", {"eps": 0.1, "lr": 1e-3, "horizon": 1.0}, 0, 0.71, 0.10))
    proto = ql.Protocol(cfg, {"id3": spec}, None, dry=True, done={r["key"]: r for r in runs})
    assert proto.tune("t", "id3") == {"eps": 0.1, "lr": 1e-3, "horizon": 1.0}
    # the table reports that pick's test runs (seed 0 is the grid run itself)
    cells = ql.summarize(cfg, {"id3": spec}, {r["key"]: r for r in runs})
    assert cells["t/id3"]["test"]["values"] == [0.10]
    assert cells["t/id3"]["seeds_run"] == [0]


def test_targets_report_margins_and_what_was_not_measured():
    cfg = {**ql.SMOKE, "tasks": ["t"], "seeds": [0]}
    cells = {f"t/{n}": {"name": n, "test": {"mean": v}} for n, v in
             {"id3": 0.80, "pafi": 0.82, "random": 0.79, "lora": 0.81}.items()}
    goals = {g["target"]: g for g in ql.targets(cfg, cells, ["id3"])}
    assert goals["best selective (pafi) >= LoRA at matched count"]["margin"] == pytest.approx(
        0.01)
    assert goals["id3 >= PaFI"]["met"] is False
    assert goals["id3 >= PaFI"]["margin"] == pytest.approx(-0.02)
    assert goals["id3 >= random"]["met"] is True
    assert goals["best selective (pafi) within 1.0 point of full FT"]["met"] is None


def table_rows_well_formed(md: str) -> int:
    """Every markdown table row has as many cells as its header; returns the rows seen."""
    rows, width = 0, None
    for line in md.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = line.count("|")
        if width is None:
            width = cells
        assert cells == width, line
        rows += 1
    return rows


@pytest.mark.side
@pytest.mark.slow
def test_smoke_run_resumes_without_retraining_and_writes_json_markdown_plot(
        tmp_path, monkeypatch, capsys):
    # real MiniLM runs on a few short rows: PaFI's two-point lr grid (seed 0) + seed 1
    monkeypatch.setitem(ql.SMOKE, "seeds", [0, 1])
    monkeypatch.setitem(ql.SMOKE, "epochs", 1)
    args = ["--smoke", "--methods", "pafi", "--report-methods", "pafi", "--out", str(tmp_path)]
    ql.main(args)
    lines = (tmp_path / "quality_long_runs.jsonl").read_text().splitlines()
    runs = [json.loads(x) for x in lines]
    assert len(runs) == 3  # 2 grid runs + seed 1: seed 0 of the pick is its grid run
    grid = [r for r in runs if r["seed"] == 0]
    best = max(grid, key=lambda r: (r["dev_accuracy"], -r["setting"]["lr"]))
    (seed1,) = [r for r in runs if r["seed"] == 1]
    assert seed1["setting"] == best["setting"]  # picked on dev
    assert all(r["budget_used"] <= r["budget"] and r["steps"] == 3 for r in runs)
    assert all(r["command"].startswith("python -m benchmarks.quality.long") for r in runs)

    payload = json.loads((tmp_path / "quality_long.json").read_text())
    assert payload["complete"] and payload["cells"]["rt_plot3/pafi"]["picked"] == best["setting"]
    assert payload["cells"]["rt_plot3/pafi"]["test"]["n"] == 2
    md = (tmp_path / "quality_long.md").read_text()
    assert table_rows_well_formed(md) >= 6
    assert "PARTIAL" not in md and payload["machine"]["cpu"] in md and "| PaFI (`pafi`) |" in md
    assert (tmp_path / "quality_long.png").stat().st_size > 1000
    capsys.readouterr()

    ql.main(args)  # the same command again: every run is reused, nothing trained
    assert "0 runs to train (3 already in" in capsys.readouterr().out
    assert (tmp_path / "quality_long_runs.jsonl").read_text().splitlines() == lines

    monkeypatch.setitem(ql.SMOKE, "epochs", 2)  # another protocol in the same files: refused
    with pytest.raises(SystemExit, match="epochs"):
        ql.main(args)
