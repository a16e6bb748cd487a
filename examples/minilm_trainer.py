"""Fine-tunes MiniLM (all-MiniLM-L6-v2, offline) on Rotten Tomatoes with ``transformers.Trainer``.

Methods: ``id3``, ``pafi``, ``bitfit`` through the selective torch optimizer
(``get_selective_optimizer(torch.optim.AdamW, method)`` with the new head as ``choose_all``),
``fft`` (plain AdamW, every entry) and ``lora`` (peft LoRA on query/value with the rank
matched to the budget, head trainable, plain AdamW). The budget is a fraction of the
encoder's parameters plus the head. Runs offline::

    python examples/minilm_trainer.py --method id3 --budget-frac 0.002 --steps 200
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import _common  # noqa: E402
from examples import _torch_common as tc  # noqa: E402

SELECTIVE = ("id3", "pafi", "bitfit", "fish", "random")
FISH_STEPS = 16
METHODS = (*SELECTIVE, "fft", "lora")
LORA_TARGETS = ("query", "value")


class TextData(torch.utils.data.Dataset):
    def __init__(self, enc: dict[str, np.ndarray], labels: np.ndarray):
        self.enc = {k: torch.as_tensor(v) for k, v in enc.items()}
        self.labels = torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_common.minilm_path())


def text_data(split: _common.TextSplit, max_length: int) -> TextData:
    enc = tokenizer()(split.texts, padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="np")
    return TextData({k: np.asarray(v, np.int64) for k, v in enc.items()}, split.labels)


@functools.lru_cache(maxsize=16)
def split_data(split: str, n: int | None, max_length: int,
               task: str = "rotten_tomatoes") -> TextData:
    """The first ``n`` rows of a split of ``task`` (``_common.text_task``), tokenized once
    per process."""
    return text_data(_common.take(_common.text_task(task)[0][split], n), max_length)


_PRETRAINED: dict[tuple[int, int], torch.nn.Module] = {}


def pretrained(seed: int, num_labels: int = 2) -> torch.nn.Module:
    """A fresh copy of MiniLM with a ``num_labels``-way head initialised under ``seed``.

    The first call per (seed, num_labels) loads the weights (``from_pretrained`` after
    ``torch.manual_seed(seed)``); later calls deep-copy that model, which gives the same
    parameters without reading the file again."""
    if (seed, num_labels) not in _PRETRAINED:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging

        logging.set_verbosity_error()
        torch.manual_seed(seed)
        _PRETRAINED[seed, num_labels] = AutoModelForSequenceClassification.from_pretrained(
            _common.minilm_path(), num_labels=num_labels)
    return copy.deepcopy(_PRETRAINED[seed, num_labels])


def lora_rank_for(budget_body: int, model: torch.nn.Module) -> int:
    """LoRA rank whose LoRA entries come closest to ``budget_body`` (at least 1)."""
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LORA_TARGETS)
    return max(1, round(budget_body / per_rank))


def build_model(method: str, seed: int, budget_body: int = 0, *, num_labels: int = 2,
                lora_rank: int | None = None) -> torch.nn.Module:
    """MiniLM with a fresh ``num_labels``-way head (seeded); for ``lora`` wrapped by peft,
    head trainable, at ``lora_rank`` (default: the rank closest to ``budget_body``)."""
    model = pretrained(seed, num_labels)
    if method != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    rank = lora_rank or lora_rank_for(budget_body, model)
    torch.manual_seed(seed + 1)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=list(LORA_TARGETS)))
    for name, p in model.named_parameters():
        if ".classifier." in f".{name}":
            p.requires_grad = True
    return model


def selected_by_part(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Selected entries per kind of parameter (word embeddings, other embeddings, attention
    matrices, feed-forward matrices, 1-D leaves (biases, LayerNorm), pooler, head)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out: dict[str, int] = {}
    for p, m in zip(params, optimizer.get_masks()):
        n = names.get(id(p), "?")
        kind = ("head" if "classifier" in n else "pooler" if "pooler" in n
                else "1-D (bias, LayerNorm)" if p.dim() <= 1
                else "word embeddings" if "word_embeddings" in n
                else "other embeddings" if "embeddings" in n
                else "attention matrices" if "attention" in n else "feed-forward matrices")
        out[kind] = out.get(kind, 0) + int(m.sum())
    return out


def make_optimizer(model, method: str, *, lr: float, budget: int, max_steps: int, exp: float,
                   eps: float, seed: int = 0, inner: type = torch.optim.AdamW,
                   id3_options: dict[str, Any] | None = None):
    """``inner`` (a ``torch.optim.Optimizer`` class taking ``lr`` and ``weight_decay``) is the
    optimizer the selective wrapper drives, or the plain optimizer for fft/lora.
    ``id3_options`` (e.g. ``{"score_decay": 0.9, "leaf_share": 0.05}``) go to ID3."""
    if method in ("fft", "lora"):
        return inner([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    from selective_optimizers.wrap import get_selective_optimizer

    # weight_decay=0 as for fft/lora above and optax.adam in JAX (torch's AdamW default is 0.01)
    kwargs: dict[str, Any] = {"lr": lr, "budget": budget, "weight_decay": 0.0}
    if method == "id3":
        kwargs.update(max_steps=max_steps, exp=exp, eps=eps, **(id3_options or {}))
    elif method == "fish":  # Fisher score from the first few batches, then a fixed mask
        kwargs.update(fish_steps=min(FISH_STEPS, max_steps))
    elif method == "random":
        kwargs.update(seed=seed)
    return get_selective_optimizer(inner, method)(
        params=tc.param_groups(model), **kwargs)


def finetune(
    *,
    method: str = "id3",
    budget_frac: float = 0.002,
    lr: float = 1e-3,
    steps: int = 100,
    max_steps: int | None = None,
    batch_size: int = 16,
    max_length: int = 64,
    n_train: int | None = 2000,
    eval_split: str = "test",
    n_eval: int | None = 500,
    seed: int = 0,
    exp: float = 1.0,
    eps: float = 1e-3,
    summary: str | None = None,
    trainer: bool = True,
    check_summary: bool = True,
    device: str = "cpu",
    dynamic_padding: bool = True,
    eval_batch_size: int = 128,
    also_eval: dict[str, int | None] | None = None,
    inner_optimizer: type = torch.optim.AdamW,
    id3_options: dict[str, Any] | None = None,
    task: str = "rotten_tomatoes",
    warmup: int | None = None,
    lora_rank: int | None = None,
) -> dict[str, Any]:
    """Fine-tunes MiniLM and returns accuracy, losses, entries changed and summary size.

    ``device="cuda"`` trains there (the summary check then needs ``check_summary=False``,
    since the reloaded CPU model's outputs are compared bit for bit). ``dynamic_padding``
    cuts every batch to its longest row and scores the eval rows sorted by length (same
    results up to float rounding, less time on padding). ``also_eval`` (split -> rows)
    scores the trained model on more splits too: ``result["also_accuracy"][split]``.
    ``task`` names the data (``_common.text_task``). ``warmup`` (steps), if given, sets a
    learning-rate schedule: linear warm-up then linear decay to 0
    (``_common.warmup_linear_decay``); otherwise the rate is constant. ``lora_rank`` fixes
    LoRA's rank instead of matching the budget.
    ``id3_options`` (e.g. ``{"score_decay": 0.9}``) go to ID3 (:func:`make_optimizer`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    num_labels = _common.text_task(task)[1]
    train = split_data("train", n_train, max_length, task)
    evals = split_data(eval_split, n_eval, max_length, task)

    base = build_model("fft", seed, num_labels=num_labels)
    n_head = sum(p.numel() for p in base.classifier.parameters())
    n_body = sum(p.numel() for p in base.bert.parameters())
    budget = _common.budget_from_fraction(budget_frac, n_body, n_head)
    model = (base if method != "lora" else build_model(
        "lora", seed, budget - n_head, num_labels=num_labels, lora_rank=lora_rank)).to(device)
    max_steps = max(1, steps // 2) if max_steps is None else max_steps
    optimizer = make_optimizer(model, method, lr=lr, budget=budget, max_steps=max_steps,
                               exp=exp, eps=eps, seed=seed, inner=inner_optimizer,
                               id3_options=id3_options)
    scheduler = None
    if warmup is not None:
        if trainer:
            raise ValueError("warmup= needs trainer=False (the Trainer loop runs at a constant "
                             "rate here); pass trainer=False")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: _common.warmup_linear_decay(t, steps, warmup))
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    collate = tc.dynamic_padding_collate if dynamic_padding else None
    torch.manual_seed(seed)  # dropout draws depend on the seed only, not on what ran before
    t0 = time.perf_counter()
    if trainer:
        losses = tc.trainer_loop(model, optimizer, train, steps=steps, batch_size=batch_size,
                                 seed=seed, collate=collate)
    else:
        losses = tc.train_loop(model, optimizer, train, steps=steps, batch_size=batch_size,
                               seed=seed, desc=f"torch {method}", collate=collate,
                               scheduler=scheduler)
    train_s = time.perf_counter() - t0

    def score(data: TextData) -> tuple[torch.Tensor, float]:
        out = tc.predict(model, data, eval_batch_size, by_length=dynamic_padding)
        return out, _common.accuracy(out.argmax(-1).numpy(), data.labels.numpy())

    logits, acc = score(evals)
    also = {split: score(split_data(split, n, max_length, task))[1]
            for split, n in (also_eval or {}).items()}
    changed = tc.count_changed(before, model)
    with torch.no_grad():  # size of the change, body only (the head starts from random)
        deltas = [(p.detach() - before[n]).reshape(-1) for n, p in model.named_parameters()
                  if n in before and ".classifier." not in f".{n}"]
        delta = torch.cat(deltas)
        moved = delta[delta != 0].abs()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "framework": "torch", "method": method, "budget_frac": budget_frac, "lr": lr,
        "seed": seed, "steps": steps, "accuracy": acc, "losses": losses,
        "encoder_params": n_body, "head_params": n_head, "changed": changed,
        "train_seconds": train_s, "also_accuracy": also, "n_eval_rows": len(evals),
        "body_delta_l2": float(delta.norm()),
        "body_delta_abs_mean": float(moved.mean()) if moved.numel() else 0.0,
        "body_delta_abs_max": float(moved.max()) if moved.numel() else 0.0,
    }
    if method in SELECTIVE:
        # selected entries; ``changed`` can be lower (e.g. embedding rows never in a batch)
        selected = optimizer.get_budget_used()
        result["selected"] = selected
        result["selected_by_part"] = selected_by_part(model, optimizer)
    if method in SELECTIVE and not check_summary:
        result.update(budget=budget, budget_used=selected, summary_bytes=None,
                      reload_equal=None)
    elif method in SELECTIVE:
        identical, size = tc.summary_round_trip(
            optimizer, model, lambda: build_model(method, seed, num_labels=num_labels), evals,
            logits, summary,
            batch_size=eval_batch_size, by_length=dynamic_padding)
        result.update(budget=budget, budget_used=selected, summary_bytes=size,
                      reload_equal=identical)
    else:  # fft: every entry; lora: the adapter + head, stored as a dense state dict
        result.update(budget=trainable, budget_used=trainable,
                      summary_bytes=4 * trainable, reload_equal=None)
        if method == "lora":
            result["lora_rank"] = model.peft_config["default"].r
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, default="id3")
    p.add_argument("--budget-frac", type=float, default=0.002, help="of encoder params (+ head)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=None, help="ID3's T (default steps // 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=500, help="test rows to score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exp", type=float, default=1.0)
    p.add_argument("--eps", type=float, default=1e-3,
                   help="ID3's eps (0.1, the ID3 paper's, is ~3x MiniLM's median |θ| and did worse "
                   "here: benchmarks/results/quality_id3_ablation.md)")
    p.add_argument("--summary", default=None, help="keep the summary file here")
    p.add_argument("--no-dynamic-padding", dest="dynamic_padding", action="store_false",
                   help="pad every batch to --max-length (default: to its longest row)")
    args = p.parse_args(argv)
    r = finetune(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    k = max(1, len(r["losses"]) // 4)
    print(f"loss {np.mean(r['losses'][:k]):.4f} -> {np.mean(r['losses'][-k:]):.4f}; "
          f"entries changed {r['changed']}; summary reload identical: {r['reload_equal']}")
    if r["reload_equal"] is False:
        raise SystemExit("the reloaded summary does not reproduce the trained model's outputs")
    if r["method"] in SELECTIVE and r["changed"] > r["budget"]:
        raise SystemExit(f"{r['changed']} entries changed, over the budget {r['budget']}")
    _common.final_line(accuracy=r["accuracy"], budget_used=r["budget_used"],
                       budget=r["budget"], summary_bytes=r["summary_bytes"],
                       extra=f"method={r['method']}")
    return r


if __name__ == "__main__":
    main()
