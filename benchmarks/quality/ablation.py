"""Why does ID3 trail? A small ablation of ID3 on MiniLM / Rotten Tomatoes (torch bridge).

Question (issue #5): at equal budget ID3 came out behind LoRA, and behind PaFI at 1% with a
large spread over seeds (``quality_fixedlr_h100.md``). Two suspects:

1. **Adam's bias correction under a global step count.** The selective wrapper hands the
   inner AdamW a zero gradient for every unselected entry from step 0, so AdamW's step count
   ``t`` is global. An entry first selected at step ``t0`` starts with ``m = v = 0``; at
   its first update ``m = 0.1 g``, ``v = 0.001 g^2`` but the corrections divide by
   ``1 - 0.9^t`` and ``1 - 0.999^t`` of the *global* ``t``: for ``t0 >> 10``
   ``m_hat ~ 0.1 g`` and ``v_hat ~ 0.001 g^2 / (1 - 0.999^t)``, i.e. about ``g^2 / t`` while
   ``t << 1000``. Its step is then ``lr * 0.1 sqrt(t)`` at first and grows to
   ``lr * (1 - 0.9^k) sqrt(t / k)`` after ``k`` steps of a steady gradient (about 1.8 lr at
   ``t = 75``, ``k = 10``), where a freshly started Adam would take ``lr``. This is what the
   reference package and DESIGN.md section 4 prescribe; the arm ``entry-adam`` replaces the
   inner optimizer by :class:`EntryAdam`, whose bias correction counts per entry from the
   first step the entry got a non-zero (masked) gradient, i.e. the step it was selected.
2. **The unmasking window.** ID3 spends the budget over ``T = steps / 2`` steps, so for
   much of a short run it trains fewer entries than PaFI (which has all of its budget from
   step 0), and late entries get few updates. The arm ``T=steps/10`` spends it 5x sooner.

Arms (all: AdamW betas (0.9, 0.999), eps 1e-8, no weight decay; ID3 exp 1, eps 0.1 unless
the arm says otherwise; the same lr; the same data order and dropout draws for the same seed):

* ``id3``: ID3 as in the benchmark (T = steps / 2, AdamW with the global step count);
* ``id3 + entry-adam``: the same selection, :class:`EntryAdam` as the inner optimizer;
* ``id3 T=steps/10``: AdamW, budget spent within the first tenth of training;
* ``id3 T=steps/10 + entry-adam``;
* ``id3 eps=1e-3``, ``id3 eps=1e-3 T=steps/10``, ``id3 exp=2``: the score's magnitude term
  made to matter (eps 0.1 is about 3x the median |θ| of MiniLM, so the default score is
  nearly |g| of one batch);
* ``pafi``, ``pafi + entry-adam``: the fixed-mask reference at the same budget (for PaFI
  every entry starts at step 0 except embedding rows whose first gradient comes later).

Run (one process; the data are tokenized and the weights loaded once)::

    python -m benchmarks.quality.ablation            # 1% budget, 3 seeds, 150 steps
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.runs import ROOT, run_info, run_line


class EntryAdam(torch.optim.Optimizer):
    """Adam(W) whose bias correction counts per entry, from the entry's first non-zero gradient.

    Under a selective wrapper an entry's gradient is exactly zero until it is selected (and
    ID3 selects only entries with a non-zero score, so at the step of selection the gradient
    is non-zero). Each entry keeps ``n``, the number of steps since (and including) the first
    step its gradient was non-zero; moments update as in Adam (``m = b1 m + (1-b1) g``,
    ``v = b2 v + (1-b2) g^2``) and the update is
    ``lr * (m / (1 - b1^n)) / (sqrt(v / (1 - b2^n)) + eps)`` where ``n >= 1``, zero where
    ``n = 0``. When every entry has a non-zero gradient from step 1 this is ``torch.optim.Adam``.
    ``weight_decay`` is decoupled (AdamW) and, like the update, only applied to started
    entries.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad EntryAdam hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["n"] = torch.zeros(p.numel(), dtype=torch.int32, device=p.device)
                    state["exp_avg"] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                n, m, v = state["n"], state["exp_avg"], state["exp_avg_sq"]
                g = p.grad.reshape(-1)
                # only started entries (and those starting now) change: with a selective
                # wrapper that is the selection, a small part of the tensor
                idx = ((n > 0) | (g != 0)).nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                gi, ni = g[idx], n[idx] + 1
                mi = m[idx].mul_(b1).add_(gi, alpha=1 - b1)
                vi = v[idx].mul_(b2).addcmul_(gi, gi, value=1 - b2)
                n[idx], m[idx], v[idx] = ni, mi, vi
                nf = ni.to(p.dtype)
                update = (mi / (1 - b1 ** nf)) / ((vi / (1 - b2 ** nf)).sqrt() + group["eps"])
                flat = p.view(-1)
                if group["weight_decay"]:
                    update.add_(flat[idx], alpha=group["weight_decay"])
                flat.index_add_(0, idx, update, alpha=-group["lr"])
        return loss


ARMS: dict[str, dict[str, Any]] = {
    "id3": dict(method="id3", t_div=2, entry=False),
    "id3 + entry-adam": dict(method="id3", t_div=2, entry=True),
    "id3 T=steps/10": dict(method="id3", t_div=10, entry=False),
    "id3 T=steps/10 + entry-adam": dict(method="id3", t_div=10, entry=True),
    # the score |g| / (|θ| + eps) ** exp: eps 0.1 is ~3x MiniLM's median |θ|, so the score is
    # nearly |g|; a small eps (or exp 2) leans toward small weights, as PaFI does
    "id3 eps=1e-3": dict(method="id3", t_div=2, entry=False, eps=1e-3),
    "id3 eps=1e-3 T=steps/10": dict(method="id3", t_div=10, entry=False, eps=1e-3),
    "id3 exp=2": dict(method="id3", t_div=2, entry=False, exp=2.0),
    "pafi": dict(method="pafi", t_div=None, entry=False),
    "pafi + entry-adam": dict(method="pafi", t_div=None, entry=True),
}


def late_step_factor(t: int, k: int, b1: float = 0.9, b2: float = 0.999) -> float:
    """|update| / lr after ``k`` steps of a constant gradient for an entry unmasked at global
    step ``t - k + 1`` (1-based), under Adam with the global step count ``t`` (eps -> 0)."""
    m = 1 - b1 ** k
    v = 1 - b2 ** k
    return (m / (1 - b1 ** t)) / math.sqrt(v / (1 - b2 ** t))


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.quality.run import machine
    from examples.minilm_trainer import finetune

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-frac", type=float, default=0.01)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=2400)
    p.add_argument("--n-test", type=int, default=None, help="test rows (default: all)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="quality_id3_ablation")
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in <out>/<tag>.json (same config) and add these")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    command = " ".join(["python -m benchmarks.quality.ablation"] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    t0 = time.time()
    runs: list[dict] = []
    commands = [command]
    old_wall = 0.0
    path = Path(args.out) / f"{args.tag}.json"
    if args.append and path.exists():
        old = json.loads(path.read_text())
        if (old["config"]["steps"], old["config"]["lr"], old["config"]["budget_frac"]) != (
                args.steps, args.lr, args.budget_frac):
            raise SystemExit(f"{path} holds another configuration; not appending")
        runs = old["runs"]
        commands = old.get("commands", [old["command"]]) + [command]
        old_wall = old["wall_seconds"]
        kept = {k: old[k] for k in ("analysis", "notes") if k in old}  # written by hand
    else:
        kept = {}
    for seed in seeds:  # seed-major: an interrupted run still has every arm for the first seeds
        for arm in arms:
            spec = ARMS[arm]
            kw: dict[str, Any] = {}
            if spec["t_div"]:
                kw["max_steps"] = max(1, args.steps // spec["t_div"])
            c0, w0 = time.process_time(), time.time()
            r = finetune(method=spec["method"], budget_frac=args.budget_frac, lr=args.lr,
                         seed=seed, steps=args.steps, batch_size=16, max_length=64,
                         n_train=args.n_train, eval_split="test", n_eval=args.n_test,
                         eps=spec.get("eps", 0.1), exp=spec.get("exp", 1.0),
                         trainer=False, check_summary=False,
                         inner_optimizer=EntryAdam if spec["entry"] else torch.optim.AdamW,
                         **kw)
            losses = r.pop("losses")
            r.update(arm=arm, max_steps=kw.get("max_steps"), wall_seconds=time.time() - w0,
                     cpu_seconds=time.process_time() - c0,
                     loss_first=float(np.mean(losses[:10])),
                     loss_last=float(np.mean(losses[-20:])), losses=losses)
            runs.append(r)
            print(f"[ablation] {arm:28s} seed={seed} acc={r['accuracy']:.4f} "
                  f"loss {r['loss_first']:.3f}->{r['loss_last']:.3f} "
                  f"|d|mean={r['body_delta_abs_mean']:.2e} ({r['wall_seconds']:.0f}s)", flush=True)
            write(Path(args.out), args.tag, dict(
                command=" && ".join(commands), commands=commands, date=dt.datetime.now(dt.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC"), machine=machine(), wall_seconds=old_wall + time.time() - t0,
                config=dict(budget_frac=args.budget_frac,
                            seeds=sorted({r["seed"] for r in runs}), steps=args.steps,
                            lr=args.lr, n_train=args.n_train, n_test=args.n_test,
                            batch_size=16, max_length=64,
                            arms={a: ARMS[a] for a in ARMS if any(r["arm"] == a for r in runs)}),
                complete=(seed, arm) == (seeds[-1], arms[-1]), runs=runs, **kept))
    return {"runs": runs}


def summarize(runs: list[dict], arm: str, key: str) -> tuple[float, float, int]:
    xs = [r[key] for r in runs if r["arm"] == arm]
    if not xs:
        return float("nan"), float("nan"), 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def write(out: Path, tag: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "run": payload.get("run") or run_info()}  # the commit it ran on
    (out / f"{tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
    cfg, runs, m = payload["config"], payload["runs"], payload["machine"]
    n_test = runs[0]["n_eval_rows"] if runs else cfg["n_test"]
    lines = ["# ID3 ablation: Adam bias correction and unmasking window"
             + ("" if payload["complete"] else f" (INCOMPLETE: {len(runs)} runs so far)"), "",
             f"- command: `{payload['command']}`",
             f"- machine: {m['cpu']}, {m['cores_visible']} cores visible, torch {m['torch']};"
             f" GPU: {m['gpu']}",
             f"- date: {payload['date']}, wall time {payload['wall_seconds'] / 60:.1f} min",
             run_line(payload["run"]),
             f"- MiniLM on Rotten Tomatoes, budget {cfg['budget_frac']:.2%} of the encoder + "
             f"head, lr {cfg['lr']:g} for every arm, {cfg['steps']} steps, batch 16, "
             f"train rows {cfg['n_train']}, test rows {n_test or 'all'}, seeds {cfg['seeds']}",
             *[f"- note: {n}" for n in payload.get("notes", [])],
             "", "| arm | test accuracy (mean ± sd) | per seed | train loss, last 20 steps |"
             " mean abs change of moved body entries |", "|---|---|---|---|---|"]
    for arm in cfg["arms"]:
        mean, sd, n = summarize(runs, arm, "accuracy")
        if not n:
            continue
        per = ", ".join(f"{r['accuracy']:.4f}" for r in runs if r["arm"] == arm)
        lm, ls, _ = summarize(runs, arm, "loss_last")
        dm, _, _ = summarize(runs, arm, "body_delta_abs_mean")
        lines.append(f"| {arm} | {mean:.4f} ± {sd:.4f} (n={n}) | {per} | {lm:.3f} ± {ls:.3f} "
                     f"| {dm:.2e} |")
    lines += ["", "Step of an entry first selected at global step t0, after k steps of a steady "
              "gradient, in units of lr (Adam, betas 0.9/0.999, eps -> 0): global step count "
              "(the wrapper's AdamW) vs per-entry count (EntryAdam, always 1):", "",
              "| t0 | k=1 | k=5 | k=10 | k=30 |", "|---|---|---|---|---|"]
    for t0 in (1, 10, 30, 50, 75):
        lines.append(f"| {t0} | " + " | ".join(f"{late_step_factor(t0 + k - 1, k):.2f}"
                                               for k in (1, 5, 10, 30)) + " |")
    if payload.get("analysis"):
        lines += ["", "## Analysis"]
        for para in payload["analysis"]:
            lines += ["", para]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
