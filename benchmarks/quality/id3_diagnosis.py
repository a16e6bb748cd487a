"""Why ID3 trails, measured: where its budget goes, how stable one step's scores are, what the
global Adam step count does to entries selected late, and what the options change.

MiniLM on Rotten Tomatoes through the torch bridge (``examples.minilm_trainer``), short runs:

* **budget**: entries selected per kind of parameter (word / position embeddings, attention,
  feed-forward, LayerNorm, pooler, biases), the largest leaves, and the word-embedding rows
  (how many, and how many of them belong to tokens seen in the first batches);
* **stability** (the plain ``id3`` arm): at every update ``t < max_steps``, the single-step
  D3 score of every body entry (before the step, none excluded); the overlap of its top-``k``
  sets between consecutive steps, ``|A_t & A_(t+1)| / k``, for ``k = k_t`` and for
  ``k = B_eff``, and the same for the running average ``score_decay = 0.9`` would rank by;
* **late entries**: the step each entry was selected at, and Adam's step on it (in units of
  lr, steady gradient, eps -> 0) under the global step count relative to a per-entry count;
* **arms**: accuracy on dev rows (never test) of the options and horizons.

Run (one process; seed 0; about 2 minutes per arm of 100 steps on a 2-core CPU)::

    python -m benchmarks.quality.id3_diagnosis
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.quality.ablation import late_step_factor
from benchmarks.runs import ROOT, run_line, write_json

ARMS: dict[str, dict[str, Any]] = {
    "id3": dict(t_frac=0.5),
    "id3 T=0.1": dict(t_frac=0.1),
    "id3 T=1.0": dict(t_frac=1.0),
    "id3 score_decay=0.9": dict(t_frac=0.5, options=dict(score_decay=0.9)),
    "id3 leaf_share=0.05": dict(t_frac=0.5, options=dict(leaf_share=0.05)),
    "id3 score_decay=0.9 leaf_share=0.05": dict(
        t_frac=0.5, options=dict(score_decay=0.9, leaf_share=0.05)),
    "pafi": dict(method="pafi"),
}


def kind(name: str, shape: tuple[int, ...]) -> str:
    """The kind of a MiniLM (BERT) parameter, from its name."""
    if "word_embeddings" in name:
        return "word embeddings"
    if "position_embeddings" in name or "token_type_embeddings" in name:
        return "position/type embeddings"
    if "LayerNorm" in name:
        return "LayerNorm"
    if "pooler" in name:
        return "pooler" + (" bias" if len(shape) == 1 else " weight")
    if len(shape) == 1:
        return "biases"
    if "attention" in name:
        return "attention weights"
    return "feed-forward weights"


def d3(p: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return (g.abs() / (p.abs() + eps)).reshape(-1)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a| of two index sets (1-D int64 tensors of equal size)."""
    return float(np.intersect1d(a.numpy(), b.numpy(), assume_unique=True).size) / max(1, a.numel())


def run_arm(arm: str, args, seed: int, train, evals) -> dict[str, Any]:
    import examples._common as ec
    import examples._torch_common as tc
    from examples import minilm_trainer as mt

    spec = ARMS[arm]
    method = spec.get("method", "id3")
    model = mt.build_model("fft", seed)
    groups = tc.param_groups(model)
    n_head = sum(p.numel() for p in groups[0]["params"])
    body = groups[1]["params"]
    n_body = sum(p.numel() for p in body)
    budget = ec.budget_from_fraction(args.budget_frac, n_body, n_head)
    b_eff = budget - n_head
    max_steps = max(1, round(spec.get("t_frac", 0.5) * args.steps))
    opt = mt.make_optimizer(model, method, lr=args.lr, budget=budget, max_steps=max_steps,
                            exp=1.0, eps=args.eps, seed=seed,
                            id3_options=spec.get("options"))
    names = {id(p): n for n, p in model.named_parameters()}
    leaf_names = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    stable = arm == "id3" and args.stability
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, generator=gen,
                                         collate_fn=tc.dynamic_padding_collate)
    torch.manual_seed(seed)
    losses: list[float] = []
    seen_first: set[int] = set()  # tokens of the batches during the unmasking window
    seen_5: set[int] = set()  # ... of the first 5 batches
    picked_at: list[int] = []  # per selected body entry (new at step t): t
    prev: dict[str, Any] = {}
    stab: dict[str, list[float]] = {"k_t": [], "B_eff": [], "avg k_t": [], "avg B_eff": []}
    avg = None
    first_top = last_top = None
    masks_before = None
    model.train()
    t0 = time.time()
    while len(losses) < args.steps:
        for batch in loader:
            t = len(losses)
            if t == args.steps:
                break
            if t < max_steps:
                ids = set(batch["input_ids"].reshape(-1).tolist())
                seen_first |= ids
                if t < 5:
                    seen_5 |= ids
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            if stable and t < max_steps:
                with torch.no_grad():
                    s = torch.cat([d3(p, p.grad, args.eps) for p in body])
                    k = b_eff // max_steps + (1 if t < b_eff % max_steps else 0)
                    avg = s * 0.1 if avg is None else avg * 0.9 + s * 0.1
                    tops = {"k_t": torch.topk(s, k).indices, "B_eff": torch.topk(s, b_eff).indices,
                            "avg k_t": torch.topk(avg, k).indices,
                            "avg B_eff": torch.topk(avg, b_eff).indices}
                    if prev:
                        for key in stab:
                            stab[key].append(overlap(prev[key], tops[key]))
                    prev = tops
                    first_top = tops["B_eff"] if first_top is None else first_top
                    last_top = tops["B_eff"]
            if method == "id3" and t < max_steps and masks_before is None:
                masks_before = [m.clone() for m in opt.get_masks()]
            opt.step()
            if method == "id3" and t < max_steps:
                after = opt.get_masks()
                new = sum(int((a & ~b).sum()) for a, b, n in zip(after, masks_before, leaf_names)
                          if "classifier" not in n)
                picked_at += [t] * new
                masks_before = [m.clone() for m in after]
            losses.append(float(loss.item()))
    train_s = time.time() - t0
    out_logits = tc.predict(model, evals, 128, by_length=True)
    acc = float((out_logits.argmax(-1).numpy() == evals.labels.numpy()).mean())

    # where the budget went
    masks = opt.get_masks()
    per_kind: Counter = Counter()
    per_leaf: list[tuple[int, str, int]] = []
    emb_rows = emb_in_first = emb_in_5 = emb_entries = 0
    for m, n in zip(masks, leaf_names):
        if "classifier" in n:
            continue
        c = int(m.sum())
        per_kind[kind(n, tuple(m.shape))] += c
        per_leaf.append((c, n, m.numel()))
        if "word_embeddings" in n:
            rows = m.any(dim=1).nonzero().squeeze(1).tolist()
            emb_rows = len(rows)
            emb_entries = c
            row_counts = m.sum(dim=1)
            emb_in_first = int(sum(int(row_counts[r]) for r in rows if r in seen_first))
            emb_in_5 = int(sum(int(row_counts[r]) for r in rows if r in seen_5))
    per_leaf.sort(reverse=True)
    result: dict[str, Any] = dict(
        arm=arm, seed=seed, accuracy=acc, budget=budget, b_eff=b_eff, max_steps=max_steps,
        options=spec.get("options"), train_seconds=train_s,
        loss_first=float(np.mean(losses[:10])), loss_last=float(np.mean(losses[-20:])),
        per_kind=dict(per_kind), top_leaves=[(n, c, total) for c, n, total in per_leaf[:6]],
        word_rows=emb_rows, word_entries=emb_entries, word_entries_seen_in_window=emb_in_first,
        word_entries_seen_in_first5=emb_in_5, tokens_seen_in_window=len(seen_first),
    )
    if picked_at:
        at = np.array(picked_at)
        result["picked_after_step_10"] = float((at >= 10).mean())
        # mean Adam step multiplier (global vs per-entry count) over each entry's first k steps
        for k in (1, 10):
            f = [late_step_factor(t0 + k, k) for t0 in at if t0 + k <= args.steps]
            result[f"adam_factor_k{k}"] = float(np.mean(f)) if f else None
    if stable:
        result["stability"] = {key: float(np.mean(v)) for key, v in stab.items() if v}
        result["stability_first_vs_last_B_eff"] = overlap(first_top, last_top)
    print(f"[diagnosis] {arm:38s} acc={acc:.4f} loss {result['loss_first']:.3f}->"
          f"{result['loss_last']:.3f} ({train_s:.0f}s)", flush=True)
    return result


def write(out: Path, tag: str, payload: dict) -> None:
    payload = write_json(out / f"{tag}.json", payload)
    runs, cfg, m = payload["runs"], payload["config"], payload["machine"]
    lines = [
        "# ID3 diagnosis: where the budget goes, score stability, late entries, options",
        "",
        f"- command: `{payload['command']}`",
        f"- machine: {m['cpu']}, {m['cores_visible']} cores visible (shared with other jobs), "
        f"torch {m['torch']}; wall time {payload['wall_seconds'] / 60:.1f} min",
        run_line(payload["run"]),
        f"- MiniLM on Rotten Tomatoes (torch bridge, AdamW, no weight decay), budget "
        f"{cfg['budget_frac'] * 100:.2f}% of the encoder + head, lr {cfg['lr']}, ID3 eps "
        f"{cfg['eps']}, exp 1, {cfg['steps']} steps of batch 16, {cfg['n_train']} train rows, "
        f"{cfg['n_eval']} dev rows, seeds {cfg['seeds']}; `T` = max_steps as a fraction "
        "of the steps (default arm 0.5)",
        "",
        "## Accuracy (dev) and where the budget went",
        "",
        "| arm | acc | loss last 20 | pooler | word emb. (rows; % seen in first 5 batches) | "
        "pos/type emb. | attention W | feed-forward W | biases + LN | largest leaf |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        pk = r["per_kind"]
        b = max(1, r["b_eff"])

        def pct(*keys, pk=pk, b=b):
            return f"{100 * sum(pk.get(k, 0) for k in keys) / b:.1f}%"

        top = r["top_leaves"][0]
        seen5 = 100 * r["word_entries_seen_in_first5"] / max(1, r["word_entries"])
        lines.append(
            f"| {r['arm']} (seed {r['seed']}) | {r['accuracy']:.4f} | {r['loss_last']:.3f} | "
            f"{pct('pooler weight', 'pooler bias')} | {pct('word embeddings')} "
            f"({r['word_rows']} rows; {seen5:.0f}%) | {pct('position/type embeddings')} | "
            f"{pct('attention weights')} | {pct('feed-forward weights')} | "
            f"{pct('biases', 'LayerNorm')} | {top[0]}: {100 * top[1] / b:.1f}% |")
    st = [r for r in runs if "stability" in r]
    if st:
        lines += ["", "## Stability of the single-step score (plain id3, during max_steps)", "",
                  "Mean overlap `|A_t & A_(t+1)| / k` of consecutive steps' top-k sets over all "
                  "body entries (none excluded):", "",
                  "| score | k = k_t | k = B_eff | first vs last step, k = B_eff |",
                  "|---|---|---|---|"]
        for r in st:
            s = r["stability"]
            lines.append(f"| single-step D3 (seed {r['seed']}) | {s['k_t']:.3f} | "
                         f"{s['B_eff']:.3f} | {r['stability_first_vs_last_B_eff']:.3f} |")
            lines.append(f"| running average, decay 0.9 (seed {r['seed']}) | {s['avg k_t']:.3f} "
                         f"| {s['avg B_eff']:.3f} | |")
    late = [r for r in runs if "picked_after_step_10" in r]
    if late:
        lines += ["", "## Entries selected late: Adam under the global step count", "",
                  "Share of the budget selected at step >= 10, and the mean of Adam's step on "
                  "each entry (units of lr, steady gradient, eps -> 0; a per-entry count gives "
                  "1.00) at its first update and after 10 updates:", "",
                  "| arm | max_steps | selected at step >= 10 | first update | 10th update |",
                  "|---|---|---|---|---|"]
        for r in late:
            f1, f10 = r.get("adam_factor_k1"), r.get("adam_factor_k10")
            lines.append(f"| {r['arm']} | {r['max_steps']} | {100 * r['picked_after_step_10']:.0f}% "
                         f"| {f1:.2f} | {'n/a' if f10 is None else f'{f10:.2f}'} |")
    if payload.get("analysis"):
        lines += ["", "## Analysis", "", payload["analysis"]]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.quality.run import machine
    from examples import minilm_trainer as mt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-frac", type=float, default=0.002)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--seeds", default="0")
    p.add_argument("--n-train", type=int, default=2400)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--no-stability", dest="stability", action="store_false")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="quality_id3_diagnosis")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    for a in arms:
        if a not in ARMS:
            raise SystemExit(f"unknown arm {a!r}; choose from {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    command = " ".join(["python -m benchmarks.quality.id3_diagnosis"] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    train = mt.split_data("train", args.n_train, 64)
    evals = mt.split_data("dev", args.n_eval, 64)
    t0 = time.time()
    runs: list[dict] = []
    out = Path(args.out)
    path = out / f"{args.tag}.json"
    kept = json.loads(path.read_text()).get("analysis") if path.exists() else None
    for seed in seeds:
        for arm in arms:
            runs.append(run_arm(arm, args, seed, train, evals))
            write(out, args.tag, dict(
                command=command, date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=machine(), wall_seconds=time.time() - t0,
                config=dict(budget_frac=args.budget_frac, steps=args.steps, lr=args.lr,
                            eps=args.eps, seeds=seeds, n_train=args.n_train, n_eval=args.n_eval),
                runs=runs, analysis=kept))
    return {"runs": runs}


if __name__ == "__main__":
    main()
