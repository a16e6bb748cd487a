"""One summary for both frameworks: a MiniLM summary trained in PyTorch, moved onto the Flax
port of ``examples/flax_bert.py``, and back.

The torch model is ``transformers.BertForSequenceClassification`` (all-MiniLM-L6-v2, 2-way
head); the Flax one is ``examples.flax_bert.BertClassifier`` with the same weights (the head
copied from torch). :func:`torch_to_flax` is the name mapping: a torch parameter name to the
Flax path key and whether the Flax leaf is its transpose (``nn.Linear`` weights). The
example fine-tunes ``--steps`` ID3 steps in torch, saves the torch adapter folder, moves the
summary with ``torch_bridge.adapters.to_jax``, saves it as a JAX adapter folder (its config
records the naming), applies it to the Flax model, compares the logits of both frameworks,
and moves it back with ``from_jax`` (bit for bit)::

    python examples/minilm_adapters.py            # about a minute on 2 CPU cores

Only an example; it is not part of the library.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import _common  # noqa: E402

NAMING = "examples/minilm_adapters.py:torch_to_flax"
_LAYER = {
    "attention.self.query": "query", "attention.self.key": "key",
    "attention.self.value": "value", "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "mlp_in",
    "output.dense": "mlp_out", "output.LayerNorm": "mlp_norm",
}
_EMB = {"word_embeddings": "word", "position_embeddings": "position",
        "token_type_embeddings": "token_type", "LayerNorm": "norm"}


def torch_to_flax(name: str) -> tuple[str, bool] | None:
    """``(flax path key, transpose)`` for a torch ``BertForSequenceClassification`` name.

    Example:
      >>> torch_to_flax("bert.encoder.layer.3.attention.self.query.weight")
      ("['bert']['layers'][3]['query']['kernel']", True)
      >>> torch_to_flax("bert.embeddings.LayerNorm.weight")
      ("['bert']['embeddings']['norm']['scale']", False)
    """
    m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        layer, module, kind = int(m.group(1)), _LAYER.get(m.group(2)), m.group(3)
        if module is None:
            return None
        norm = module.endswith("norm")
        leaf = "bias" if kind == "bias" else "scale" if norm else "kernel"
        return f"['bert']['layers'][{layer}]['{module}']['{leaf}']", leaf == "kernel"
    m = re.fullmatch(r"bert\.embeddings\.(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _EMB:
        module, kind = _EMB[m.group(1)], m.group(2)
        leaf = "bias" if kind == "bias" else "scale" if module == "norm" else "embedding"
        return f"['bert']['embeddings']['{module}']['{leaf}']", False
    m = re.fullmatch(r"(bert\.pooler\.dense|classifier)\.(weight|bias)", name)
    if m:
        module = "pooler" if m.group(1).startswith("bert") else "classifier"
        prefix = "['bert']" if module == "pooler" else ""
        leaf = "kernel" if m.group(2) == "weight" else "bias"
        return f"{prefix}['{module}']['{leaf}']", leaf == "kernel"
    return None


def run(steps: int = 6, n_eval: int = 16, budget_frac: float = 0.005, seed: int = 0,
        folder: str | None = None) -> dict[str, Any]:
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    import optax_selective as osel
    import torch_bridge
    from examples import flax_bert
    from torch_bridge.adapters import from_jax, to_jax

    logging.set_verbosity_error()
    path = _common.minilm_path()
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tok = AutoTokenizer.from_pretrained(path)
    rt = _common.rotten_tomatoes()
    train = _common.take(rt["train"], 16 * steps)
    enc = tok(train.texts, padding="max_length", truncation=True, max_length=48,
              return_tensors="pt")
    model = copy.deepcopy(base).train()
    budget = round(budget_frac * sum(p.numel() for p in model.parameters()))
    opt = torch_bridge.get_selective_optimizer(torch.optim.AdamW, "id3")(
        model.parameters(), lr=1e-3, weight_decay=0.0, budget=budget, max_steps=steps)
    labels = torch.as_tensor(train.labels)
    for s in range(steps):
        sl = slice(16 * s, 16 * s + 16)
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=enc["input_ids"][sl], attention_mask=enc["attention_mask"][sl]).logits,
            labels[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    summary = opt.get_summary(model)
    root = folder or tempfile.mkdtemp(prefix="minilm-adapters-")
    torch_dir = torch_bridge.save_pretrained(
        summary, os.path.join(root, "torch"), base=base, overwrite=True,
        base_model="sentence-transformers/all-MiniLM-L6-v2")

    # torch -> Flax
    flax_model = flax_bert.load_bert_classifier(path, 2)
    flax_model.classifier.kernel.set_value(jnp.asarray(base.classifier.weight.detach().numpy().T))
    flax_model.classifier.bias.set_value(jnp.asarray(base.classifier.bias.detach().numpy()))
    flax_params = nnx.state(flax_model, nnx.Param)
    jax_summary = to_jax(torch_bridge.load_pretrained(torch_dir, base), torch_to_flax)
    jax_dir = osel.save_pretrained(jax_summary, os.path.join(root, "flax"), base=flax_params,
                                   base_model="sentence-transformers/all-MiniLM-L6-v2",
                                   naming=NAMING, overwrite=True)
    flax_model.eval()
    handle = osel.attach(flax_params, osel.load_pretrained(jax_dir, flax_params))
    nnx.update(flax_model, handle.params)
    test = _common.take(rt["test"], n_eval)
    e = tok(test.texts, padding=True, truncation=True, max_length=48, return_tensors="np")
    flax_logits = np.asarray(flax_model(jnp.asarray(e["input_ids"]),
                                        jnp.asarray(e["attention_mask"]),
                                        jnp.asarray(e["token_type_ids"])))
    model.eval()
    with torch.no_grad():
        torch_logits = model(**{k: torch.from_numpy(v) for k, v in e.items()}).logits.numpy()
    # Flax -> torch: the same entries and values, bit for bit
    back = from_jax(osel.load_pretrained(jax_dir), base, torch_to_flax)
    same = all(torch.equal(back["params"][n]["indices"], x["indices"])
               and torch.equal(back["params"][n]["values"], x["values"])
               for n, x in summary["params"].items()) and back["params"].keys() == summary[
                   "params"].keys()
    nnx.update(flax_model, handle.detach())
    return {"budget_used": summary["budget_used"], "n_eval": n_eval,
            "max_abs_logit_diff": float(np.max(np.abs(flax_logits - torch_logits))),
            "same_predictions": bool((flax_logits.argmax(-1) == torch_logits.argmax(-1)).all()),
            "round_trip_bit_exact": bool(same), "folders": [torch_dir, jax_dir]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--n-eval", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-4, help="fail above this max abs logit diff")
    p.add_argument("--folder", default=None, help="keep the two adapter folders here")
    args = p.parse_args(argv)
    r = run(args.steps, args.n_eval, folder=args.folder)
    print(f"{r['budget_used']} entries trained in torch; on the Flax port: max abs logit diff "
          f"{r['max_abs_logit_diff']:.2e} over {r['n_eval']} sentences, same predictions: "
          f"{r['same_predictions']}; Flax -> torch bit for bit: {r['round_trip_bit_exact']}")
    if r["max_abs_logit_diff"] > args.tol or not r["round_trip_bit_exact"]:
        raise SystemExit(1)
    return r


if __name__ == "__main__":
    main()
