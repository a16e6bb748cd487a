"""Long quality protocol: every method at its best on dev, several epochs, two tasks, 3 seeds.

What it measures: test accuracy of MiniLM (all-MiniLM-L6-v2) fine-tuned with each method at
one budget (0.2% of the encoder's entries, plus the new head, ``choose_all``), on two offline
tasks (``examples._common.text_task``):

* ``rotten_tomatoes``: fresh / rotten reviews (2 classes);
* ``rt_plot3``: the same file's reviews and plot synopses, rotten / fresh / plot (3 classes);

both split by movie (20% test, 10% dev, 70% train). Protocol:

* training: ``epochs`` passes over the first ``n_train`` train rows (batch 16), AdamW
  without weight decay (``optax.adam`` in JAX), learning rate warmed up linearly over the
  first 10% of the steps then decayed linearly to 0 (``_common.warmup_linear_decay``);
* methods (``METHODS``): ID3 (the paper's score, exp 1), ID3 with options, PaFI, random
  mask, BitFit, FISH through the torch bridge; LoRA (peft, query/value) at the rank whose
  entries come closest to the budget and at rank 8 for reference; full fine-tuning;
* hyperparameters: per method and task, a small grid on seed 0 scored on the **dev** split
  (the learning rate; for ID3 also ``eps`` and the unmasking horizon ``max_steps`` as a
  fraction of training); stages run one after another, each axis not in a stage taking the
  best value so far; the best dev accuracy wins, ties going to the smaller value. Test
  accuracy never enters a pick;
* test: the picked setting with seeds 0, 1, 2; seed 0's run is the grid run itself (every
  run scores dev *and* test, so it is not trained twice);
* JAX: the Flax port (``examples/minilm_flax.py``) with the settings picked in PyTorch, on
  ``jax_task``, seed 0, for ``jax_methods``.

Resumable: every finished run is appended at once to ``<tag>_runs.jsonl`` (one JSON object a
line, keyed by everything that defines the run); a later command with the same configuration
reuses the runs already there and trains only what is missing, so an interrupted run is
continued by running the same command again. Two commands may append to the same file at
the same time (e.g. a second one for new methods, ``--methods``). After every run the tables
``<tag>.md``, ``<tag>.json`` and ``<tag>.png`` are rebuilt from all runs so far, with every
command, machine, date and commit that contributed. Progress lines give an ETA from the
runs' own times.

Run::

    python -m benchmarks.quality.long                      # the whole protocol
    python -m benchmarks.quality.long --methods id3_smooth # one more method, same files
    python -m benchmarks.quality.long --report             # rebuild the tables only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality.run import machine
from benchmarks.runs import ROOT, run_info, run_line

FULL: dict[str, Any] = {
    "tasks": ["rotten_tomatoes", "rt_plot3"],
    "budget": 0.002,
    "seeds": [0, 1, 2],
    "epochs": 3,
    "n_train": 640,
    "batch_size": 16,
    "max_length": 48,
    "warmup_frac": 0.1,
    "n_dev": 500,
    "n_test": 1000,
    "jax_task": "rotten_tomatoes",
    "jax_methods": ["id3", "pafi", "fft"],
    "jax_seeds": [0],
}
SMOKE: dict[str, Any] = {
    "tasks": ["rt_plot3"],
    "budget": 0.002,
    "seeds": [0, 1],
    "epochs": 2,
    "n_train": 12,
    "batch_size": 4,
    "max_length": 16,
    "warmup_frac": 0.25,
    "n_dev": 12,
    "n_test": 12,
    "jax_task": "rt_plot3",
    "jax_methods": [],
    "jax_seeds": [0],
}

# method name -> what it trains and its dev grid. "stages": a list of {axis: values}; an axis
# not in a stage takes the best value found so far, or "defaults" before it is searched.
# Axes: lr; eps (ID3's score eps); horizon (ID3's max_steps as a fraction of the steps).
METHODS: dict[str, dict[str, Any]] = {
    "id3": {"method": "id3", "label": "ID3 (paper's score)",
            "defaults": {"eps": 1e-3},
            "stages": [{"lr": [1e-3, 3e-3], "horizon": [0.1, 0.3, 1.0]},
                       {"eps": [1e-3, 0.1]}]},
    "pafi": {"method": "pafi", "label": "PaFI", "stages": [{"lr": [3e-3, 1e-2]}]},
    "random": {"method": "random", "label": "random mask", "stages": [{"lr": [3e-3, 1e-2]}]},
    "bitfit": {"method": "bitfit", "label": "BitFit", "stages": [{"lr": [1e-3, 3e-3]}]},
    "fish": {"method": "fish", "label": "FISH", "stages": [{"lr": [1e-3, 3e-3]}]},
    "lora": {"method": "lora", "label": "LoRA (rank matched to the budget)",
             "stages": [{"lr": [1e-3, 3e-3]}]},
    "lora_r8": {"method": "lora", "label": "LoRA r=8 (reference)", "lora_rank": 8,
                "stages": [{"lr": [1e-3, 3e-3]}]},
    "fft": {"method": "fft", "label": "full fine-tuning", "stages": [{"lr": [5e-5, 1e-4]}]},
    # ID3's options (optax_selective/methods/id3.py, docs/methods/id3.md); a smaller grid
    # than the paper's ID3 above: lr only, at eps 1e-3 and horizon 0.3
    "id3_avg": {"method": "id3", "label": "ID3 + score_decay 0.9",
                "id3_options": {"score_decay": 0.9}, "defaults": {"eps": 1e-3, "horizon": 0.3},
                "stages": [{"lr": [1e-3, 3e-3]}]},
    "id3_avg_cap": {"method": "id3", "label": "ID3 + score_decay 0.9 + leaf_share 0.05",
                    "id3_options": {"score_decay": 0.9, "leaf_share": 0.05},
                    "defaults": {"eps": 1e-3, "horizon": 0.3},
                    "stages": [{"lr": [1e-3, 3e-3]}]},
}
ID3_VARIANTS = ("id3_avg", "id3_avg_cap")
BASELINE = ("id3", "pafi", "random", "bitfit", "fish", "lora", "lora_r8", "fft")
SELECTIVE = ("id3", "pafi", "random", "bitfit", "fish")
# in the smoke run: the same methods' code paths with one or two grid points
SMOKE_METHODS = {
    "id3": {**METHODS["id3"], "stages": [{"lr": [1e-3], "horizon": [0.5, 1.0]},
                                         {"eps": [1e-3, 0.1]}]},
    "pafi": {**METHODS["pafi"], "stages": [{"lr": [1e-3, 1e-2]}]},
    "lora": {**METHODS["lora"], "stages": [{"lr": [1e-3]}]},
}


def steps_of(cfg: dict) -> int:
    """Optimizer steps per run: ``epochs`` passes over ``n_train`` rows (last batch short)."""
    return cfg["epochs"] * math.ceil(cfg["n_train"] / cfg["batch_size"])


def run_key(task: str, framework: str, name: str, setting: dict, seed: int) -> str:
    """The identity of a run: two runs with equal keys train the same thing."""
    parts = [task, framework, name, *(f"{k}={setting[k]:g}" for k in sorted(setting)),
             f"seed={seed}"]
    return "|".join(parts)


def pick(trials: list[tuple[dict, float]]) -> dict:
    """The setting with the best **dev** accuracy among ``(setting, dev_accuracy)`` trials;
    ties go to the smaller values (in the setting's sorted axis order).

    >>> pick([({"lr": 1e-3}, 0.7), ({"lr": 3e-3}, 0.8), ({"lr": 1e-2}, 0.8)])
    {'lr': 0.003}
    """
    if not trials:
        raise ValueError("pick() needs at least one (setting, dev accuracy) trial")
    return max(trials, key=lambda t: (t[1], *(-t[0][k] for k in sorted(t[0]))))[0]


class Store:
    """Runs kept in a JSON-lines file, one finished run a line, safe for several writers
    (an exclusive ``flock`` around every append and read)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.seek(0)
                yield f
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self) -> dict[str, dict]:
        with self._locked() as f:
            lines = f.read().splitlines()
        out: dict[str, dict] = {}
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:  # a line cut by a kill: report, skip
                    print(f"{self.path}:{n}: unreadable line skipped ({e})", flush=True)
                    continue
                out[r["key"]] = r
        return out

    def append(self, record: dict) -> None:
        with self._locked() as f:
            f.seek(0, 2)
            f.write(json.dumps(record) + "\n")
            f.flush()


class Protocol:
    """Runs (or reuses) every run the protocol needs for the given methods; see the module
    docstring. ``train`` is the function that trains one run (``train_one`` by default)."""

    def __init__(self, cfg: dict, methods: dict[str, dict], store: Store | None, *,
                 dry: bool = False, train=None, meta: dict | None = None,
                 done: dict[str, dict] | None = None):
        self.cfg, self.methods, self.store, self.dry = cfg, methods, store, dry
        self.train = train or train_one
        self.meta = meta or {}
        self.done = dict(done) if done is not None else store.read() if store else {}
        self.trained = 0  # runs trained by this process
        self.planned = 0  # runs this process found missing (dry mode: counted, not trained)
        self.seconds: list[float] = []
        self.failed: list[str] = []
        self.tasks = list(cfg["tasks"])  # the tasks this process works on (all by default)
        self.expected = 0  # an estimate of the runs left, for the ETA

    # ---------------------------------------------------------------- one run
    def run(self, task: str, framework: str, name: str, setting: dict, seed: int) -> dict | None:
        key = run_key(task, framework, name, setting, seed)
        if key in self.done:
            return self.done[key]
        if self.store is not None:  # another process may have made it meanwhile
            self.done.update(self.store.read())
            if key in self.done:
                return self.done[key]
        self.planned += 1
        if self.dry:
            return None
        w0 = time.time()
        try:
            r = self.train(task=task, framework=framework, spec=self.methods[name],
                           setting=setting, seed=seed, cfg=self.cfg)
        except Exception as e:  # a broken run is reported; the others go on
            self.failed.append(f"{key}: {type(e).__name__}: {str(e)[:300]}")
            print(f"FAILED {self.failed[-1]}", flush=True)
            return None
        r.update(key=key, task=task, framework=framework, name=name, setting=setting,
                 seed=seed, wall_seconds=time.time() - w0,
                 date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 **self.meta)
        self.store.append(r)
        self.done[key] = r
        self.trained += 1
        self.seconds.append(r["wall_seconds"])
        left = max(0, self.expected - self.trained)
        eta = left * float(np.median(self.seconds))
        dev = "" if r.get("dev_accuracy") is None else f" dev={r['dev_accuracy']:.4f}"
        print(f"[{self.trained}/{self.trained + left}] {key}{dev} test={r['test_accuracy']:.4f}"
              f" ({r['wall_seconds']:.0f}s); ETA {eta / 60:.0f} min "
              f"(~{(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=eta)):%H:%M} UTC)",
              flush=True)
        return r

    # ---------------------------------------------------------------- dev grid
    def tune(self, task: str, name: str) -> dict | None:
        """The picked setting of ``name`` on ``task`` (seed 0, dev only); None while a grid run
        is missing (dry mode)."""
        spec = self.methods[name]
        best = dict(spec.get("defaults", {}))
        trials: list[tuple[dict, float]] = []
        for stage in spec["stages"]:
            grid = [dict(best)]
            for axis, values in stage.items():
                grid = [{**g, axis: v} for g in grid for v in values]
            for setting in grid:
                r = self.run(task, "torch", name, setting, 0)
                if r is None:
                    return None
                if all(s != setting for s, _ in trials):
                    trials.append((setting, r["dev_accuracy"]))
            best = pick([t for t in trials if all(t[0].get(a) == best.get(a) for a in best
                                                  if a not in stage)])
        return best

    def count_missing(self, names: list[str]) -> int:
        """How many runs :meth:`run_all` would train (exact once a method's grid is done;
        while it is not, every grid point not yet run and every seed count as one run)."""
        dry = Protocol(self.cfg, self.methods, None, dry=True, done=self.done)
        jt, n = self.cfg["jax_task"], 0
        for task in self.tasks:
            for name in names:
                spec = self.methods[name]
                before = dry.planned
                best = dry.tune(task, name)
                if best is None:  # the rest of its grid (roughly) and its other seeds
                    points = sum(math.prod(len(v) for v in st.values()) for st in spec["stages"])
                    runs = [r for r in self.done.values()
                            if r["task"] == task and r["name"] == name and r["seed"] == 0]
                    n += max(dry.planned - before, points - len(runs))
                    n += len(self.cfg["seeds"]) - 1
                    n += (task == jt and name in self.cfg["jax_methods"]) * len(
                        self.cfg["jax_seeds"])
                    continue
                n += sum(run_key(task, "torch", name, best, s) not in self.done
                         for s in self.cfg["seeds"][1:])
                if task == jt and name in self.cfg["jax_methods"]:
                    n += sum(run_key(task, "jax", name, best, s) not in self.done
                             for s in self.cfg["jax_seeds"])
        return n

    def run_all(self, names: list[str]) -> dict[str, dict]:
        """Grids for every task and method first (so every cell has a seed-0 number soon), then
        JAX, then the other seeds. Returns the picked settings by ``task/name``."""
        self.expected = self.count_missing(names)
        print(f"{self.expected} runs to train ({len(self.done)} already in "
              f"{self.store.path})", flush=True)
        picked = {}
        for task in self.tasks:
            for name in names:
                picked[f"{task}/{name}"] = self.tune(task, name)
        jt = self.cfg["jax_task"]
        for name in self.cfg["jax_methods"]:
            if name in names and picked.get(f"{jt}/{name}") is not None:
                for seed in self.cfg["jax_seeds"]:
                    self.run(jt, "jax", name, picked[f"{jt}/{name}"], seed)
        for task in self.tasks:
            for name in names:
                if picked[f"{task}/{name}"] is None:  # a grid run failed
                    continue
                for seed in self.cfg["seeds"][1:]:
                    self.run(task, "torch", name, picked[f"{task}/{name}"], seed)
        return picked


def train_one(*, task: str, framework: str, spec: dict, setting: dict, seed: int,
              cfg: dict) -> dict:
    """Trains one run and returns its record: dev and test accuracy, budget, losses."""
    steps = steps_of(cfg)
    method = spec["method"]
    horizon = setting.get("horizon", 0.5)
    common = dict(method=method, budget_frac=cfg["budget"], lr=setting["lr"], seed=seed,
                  steps=steps, max_steps=max(1, round(horizon * steps)),
                  batch_size=cfg["batch_size"], max_length=cfg["max_length"],
                  n_train=cfg["n_train"], eps=setting.get("eps", 1e-3), check_summary=False,
                  task=task, warmup=max(1, round(cfg["warmup_frac"] * steps)),
                  id3_options=spec.get("id3_options"))
    if framework == "torch":
        import torch

        from examples.minilm_trainer import finetune

        r = finetune(trainer=False, device="cuda" if torch.cuda.is_available() else "cpu",
                     eval_split="dev", n_eval=cfg["n_dev"], also_eval={"test": cfg["n_test"]},
                     lora_rank=spec.get("lora_rank"), **common)
        dev, test = r["accuracy"], r["also_accuracy"]["test"]
    else:
        from examples.minilm_flax import finetune

        if spec.get("lora_rank") or method == "lora":
            raise ValueError(f"{spec['label']}: the JAX port has no LoRA; drop it from "
                             "jax_methods")
        r = finetune(eval_split="test", n_eval=cfg["n_test"], progress=False, **common)
        dev, test = None, r["accuracy"]
    losses = r["losses"]
    keep = ("budget", "budget_used", "encoder_params", "head_params", "changed",
            "selected_by_part", "lora_rank", "train_seconds")
    return {"dev_accuracy": dev, "test_accuracy": test, "steps": steps,
            "loss_first": float(np.mean(losses[:5])), "loss_last": float(np.mean(losses[-5:])),
            **{k: r[k] for k in keep if k in r}}


# -------------------------------------------------------------------- report


def stats(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0,
            "n": len(xs), "values": xs}


def fmt(a: dict, seeds: int) -> str:
    if not a:
        return "not run"
    s = f"{a['mean']:.3f} ± {a['std']:.3f}"
    return s + (f" (n={a['n']} of {seeds})" if a["n"] < seeds else "")


def summarize(cfg: dict, methods: dict[str, dict], runs: dict[str, dict]) -> dict:
    """Picked settings and test statistics per task and method, from the runs so far (a
    method whose grid is incomplete has no pick and no cell)."""
    store_free = Protocol(cfg, methods, None, dry=True, done=runs)
    cells: dict[str, dict] = {}
    for task in cfg["tasks"]:
        for name in methods:
            setting = store_free.tune(task, name)
            trials = [{"setting": r["setting"], "dev": r["dev_accuracy"],
                       "test": r["test_accuracy"]} for r in runs.values()
                      if r["task"] == task and r["name"] == name and r["framework"] == "torch"
                      and r["seed"] == 0 and r["dev_accuracy"] is not None]
            cell = {"task": task, "name": name, "picked": setting, "grid": trials}
            if setting is not None:
                rs = [runs.get(run_key(task, "torch", name, setting, s)) for s in cfg["seeds"]]
                cell["test"] = stats([r["test_accuracy"] for r in rs if r])
                cell["seeds_run"] = [s for s, r in zip(cfg["seeds"], rs) if r]
                one = next(r for r in rs if r)
                cell["trainable"] = one.get("budget_used")
                cell["lora_rank"] = one.get("lora_rank")
                if setting is not None and task == cfg["jax_task"]:
                    js = [runs.get(run_key(task, "jax", name, setting, s))
                          for s in cfg["jax_seeds"]]
                    cell["jax_test"] = stats([r["test_accuracy"] for r in js if r])
            cells[f"{task}/{name}"] = cell
    return cells


def targets(cfg: dict, cells: dict[str, dict], recommended: list[str]) -> list[dict]:
    """Issue #24's targets per task, with the margin (positive: met by that much)."""
    out = []
    for task in cfg["tasks"]:
        def mean(name, task=task):
            return cells.get(f"{task}/{name}", {}).get("test", {}).get("mean")

        sel = [n for n in cells if n.startswith(f"{task}/") and
               cells[n]["name"] not in ("lora", "lora_r8", "fft") and mean(cells[n]["name"])]
        best = max(sel, key=lambda n: mean(cells[n]["name"]), default=None)
        best_name = cells[best]["name"] if best else None
        rows = []
        if best_name:
            rows.append((f"best selective ({best_name}) >= LoRA at matched count",
                         mean(best_name), mean("lora")))
            rows.append((f"best selective ({best_name}) within 1.0 point of full FT",
                         mean(best_name), None if mean("fft") is None else mean("fft") - 0.01))
        for rec in recommended:
            rows.append((f"{rec} >= PaFI", mean(rec), mean("pafi")))
            rows.append((f"{rec} >= random", mean(rec), mean("random")))
        for what, a, b in rows:
            margin = None if a is None or b is None else a - b
            out.append({"task": task, "target": what, "value": a, "threshold": b,
                        "margin": margin, "met": None if margin is None else margin >= 0})
    return out


def write_report(out: Path, tag: str, cfg: dict, methods: dict[str, dict], runs: dict,
                 recommended: list[str], extra: dict) -> dict:
    cells = summarize(cfg, methods, runs)
    goals = targets(cfg, cells, recommended)
    need = sum(1 for c in cells.values() for _ in cfg["seeds"])
    have = sum(len(c.get("seeds_run", [])) for c in cells.values())
    jax_need = len(cfg["jax_methods"]) * len(cfg["jax_seeds"])
    jax_have = sum(c.get("jax_test", {}).get("n", 0) for c in cells.values())
    complete = have == need and jax_have == jax_need
    commands = sorted({r["command"] for r in runs.values() if r.get("command")})
    commits = sorted({r["commit"] for r in runs.values() if r.get("commit")})
    payload = {"complete": complete, "config": cfg, "steps": steps_of(cfg), "methods": methods,
               "recommended": recommended, "cells": cells, "targets": goals,
               "commands": commands, "commits": commits, "machine": extra["machine"],
               "run": extra["run"], "notes": extra.get("notes", []),
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "train_wall_minutes": sum(r["wall_seconds"] for r in runs.values()) / 60,
               "runs": sorted(runs.values(), key=lambda r: r["key"])}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
    m = extra["machine"]
    title = "# Long quality protocol" + ("" if complete else
                                         f" (PARTIAL: {have} of {need} test cells, "
                                         f"{jax_have} of {jax_need} JAX runs)")
    lines = [title, "",
             f"MiniLM (all-MiniLM-L6-v2), budget {cfg['budget']:.1%} of the encoder (+ the head), "
             f"test accuracy, mean ± sample std over seeds {cfg['seeds']}; settings picked on "
             "dev (seed 0). Protocol: `benchmarks/quality/long.py`.", "",
             *[f"- command: `{c}`" for c in commands],
             f"- machine: {m['cpu']}, {m['cores_visible']} cores visible, torch {m['torch']}, jax "
             f"{m['jax']} ({m['jax_backend']}); GPU: {m['gpu']}"
             + (f"; {extra['load_note']}" if extra.get("load_note") else ""),
             f"- date: {payload['date']}; training wall time summed over runs "
             f"{payload['train_wall_minutes']:.0f} min",
             run_line(extra["run"]) + (f"; runs made at commits {', '.join(commits)}"
                                       if commits else ""),
             f"- {cfg['epochs']} epochs of {cfg['n_train']} train rows = {steps_of(cfg)} steps, "
             f"batch {cfg['batch_size']}, max length {cfg['max_length']}, warm-up "
             f"{cfg['warmup_frac']:.0%} then linear decay; dev rows {cfg['n_dev']}, test rows "
             f"{cfg['n_test']}", ""]
    lines += [f"- note: {n}" for n in payload["notes"]]
    for task in cfg["tasks"]:
        lines += ["", f"## {task}", "",
                  "| method | picked on dev | trainable entries | test accuracy |"
                  + (" JAX (seed 0) |" if task == cfg["jax_task"] else ""),
                  "|---|---|---|---|" + ("---|" if task == cfg["jax_task"] else "")]
        for name, spec in methods.items():
            c = cells[f"{task}/{name}"]
            setting = ("grid incomplete" if c["picked"] is None else ", ".join(
                f"{k} {v:g}" for k, v in sorted(c["picked"].items())))
            n = c.get("trainable")
            n = f"{n:,}" + (f" (r={c['lora_rank']})" if c.get("lora_rank") else "") if n else "-"
            row = f"| {spec['label']} (`{name}`) | {setting} | {n} | " \
                  f"{fmt(c.get('test', {}), len(cfg['seeds']))} |"
            if task == cfg["jax_task"]:
                row += f" {fmt(c['jax_test'], len(cfg['jax_seeds'])) if c.get('jax_test') else '-'} |"
            lines.append(row)
        lines += ["", f"Targets at {cfg['budget']:.1%} (margin = value - threshold, in accuracy "
                  "points x 100):", "", "| target | value | threshold | margin | met |",
                  "|---|---|---|---|---|"]
        for g in goals:
            if g["task"] != task:
                continue
            v = "-" if g["value"] is None else f"{g['value']:.3f}"
            t = "-" if g["threshold"] is None else f"{g['threshold']:.3f}"
            mg = "-" if g["margin"] is None else f"{100 * g['margin']:+.1f}"
            met = "not measured" if g["met"] is None else "yes" if g["met"] else "**no**"
            lines.append(f"| {g['target']} | {v} | {t} | {mg} | {met} |")
    lines += ["", "## Dev grid (seed 0)", "", "| task / method | setting: dev acc |", "|---|---|"]
    for key, c in cells.items():
        if c["grid"]:
            trials = sorted(c["grid"], key=lambda t: sorted(t["setting"].items()))
            lines.append(f"| {key} | " + "; ".join(
                ", ".join(f"{k} {v:g}" for k, v in sorted(t["setting"].items()))
                + f": {t['dev']:.3f}" for t in trials) + " |")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    plot(out / f"{tag}.png", cfg, methods, cells)
    return payload


def plot(path: Path, cfg: dict, methods: dict[str, dict], cells: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = cfg["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    names = list(methods)
    for ax, task in zip(axes[0], tasks):
        means = [cells[f"{task}/{n}"].get("test", {}).get("mean", np.nan) for n in names]
        stds = [cells[f"{task}/{n}"].get("test", {}).get("std", 0.0) for n in names]
        colors = ["tab:gray" if n == "fft" else "tab:orange" if n.startswith("lora")
                  else "tab:blue" for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color=colors, capsize=3)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        finite = [x for x in means if np.isfinite(x)]
        if finite:
            ax.set_xlim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03))
        ax.set_xlabel("test accuracy (mean ± std over seeds)")
        ax.set_title(f"{task}, budget {cfg['budget']:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(BASELINE),
                   help=f"comma list of {', '.join(METHODS)} (default: {', '.join(BASELINE)})")
    p.add_argument("--report-methods", default=None,
                   help="methods shown in the tables (default: all of METHODS)")
    p.add_argument("--recommended", default=",".join(ID3_VARIANTS),
                   help="comma list of ID3 variants whose targets (>= PaFI, >= random) the "
                        "tables check")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="quality_long")
    p.add_argument("--smoke", action="store_true", help="tiny rows and steps: a test of the code")
    p.add_argument("--report", action="store_true", help="rebuild the tables; train nothing")
    p.add_argument("--load-note", default="", help="a line about the machine's load")
    p.add_argument("--tasks", default=None,
                   help="comma list: work on these of the protocol's tasks only (e.g. one "
                        "process per task, appending to the same files); default all")
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    table = dict(SMOKE_METHODS if args.smoke else METHODS)
    names = [n for n in args.methods.split(",") if n]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(table)}")
    shown = ([n for n in args.report_methods.split(",") if n] if args.report_methods
             else list(table))
    out = Path(args.out)
    store = Store(out / f"{args.tag}_runs.jsonl")
    cfg_file = out / f"{args.tag}_config.json"
    if cfg_file.exists():  # one table, one protocol: refuse to mix configurations
        earlier = json.loads(cfg_file.read_text())
        if earlier != cfg:
            diff = sorted(k for k in {*cfg, *earlier} if cfg.get(k) != earlier.get(k))
            raise SystemExit(f"{cfg_file}: the runs there used another configuration (differs "
                             f"in {diff}); use another --tag or remove those files")
    else:
        cfg_file.write_text(json.dumps(cfg, indent=1) + "\n")
    mach = machine()
    command = " ".join(["python -m benchmarks.quality.long"] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    info = run_info()
    meta = {"command": command, "commit": info.get("commit"), "cpu": mach["cpu"]}
    runs = store.read()
    other = {r["cpu"] for r in runs.values()} - {mach["cpu"]}
    if other:
        raise SystemExit(f"{store.path} holds runs made on {sorted(other)}; this is "
                         f"{mach['cpu']}: one table must come from one machine (use --tag)")
    extra = {"machine": mach, "run": info, "load_note": args.load_note}
    recommended = [n for n in args.recommended.split(",") if n]

    def report() -> dict:
        return write_report(out, args.tag, cfg, {n: table[n] for n in shown}, store.read(),
                            [r for r in recommended if r in shown], extra)

    if not args.report:
        proto = Protocol(cfg, table, store, meta=meta)
        if args.tasks:
            proto.tasks = [t for t in args.tasks.split(",") if t]
            if not set(proto.tasks) <= set(cfg["tasks"]):
                raise SystemExit(f"--tasks {args.tasks}: the protocol's tasks are "
                                 f"{cfg['tasks']}")
        orig = proto.run

        def run_and_report(*a, **k):
            before = proto.trained
            r = orig(*a, **k)
            if proto.trained > before:
                report()
            return r

        proto.run = run_and_report
        t0 = time.time()
        proto.run_all(names)
        print(f"trained {proto.trained} runs in {(time.time() - t0) / 60:.1f} min", flush=True)
    payload = report()
    print(f"wrote {out}/{args.tag}.{{md,json,png}} ({'complete' if payload['complete'] else 'partial'})")
    return payload


if __name__ == "__main__":
    main()
