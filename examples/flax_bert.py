"""A compact BERT encoder in Flax NNX that loads PyTorch BERT safetensors (e.g. MiniLM).

transformers 5 has no Flax classes, so this file holds a small, readable BERT: embeddings,
post-LayerNorm encoder layers (exact-erf GELU), the tanh pooler and a classification head,
with the same structure as ``transformers.BertForSequenceClassification``.
:func:`load_bert_classifier` fills it from ``model.safetensors`` read with
``safetensors.numpy.load_file`` (no torch needed).

Run it to check the port against the PyTorch model on a few real sentences::

    python examples/flax_bert.py            # prints the max abs differences

Only an example; it is not part of the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import _common  # noqa: E402


class Embeddings(nnx.Module):
    def __init__(self, cfg: dict, rngs: nnx.Rngs):
        h = cfg["hidden_size"]
        self.word = nnx.Embed(cfg["vocab_size"], h, rngs=rngs)
        self.position = nnx.Embed(cfg["max_position_embeddings"], h, rngs=rngs)
        self.token_type = nnx.Embed(cfg["type_vocab_size"], h, rngs=rngs)
        self.norm = nnx.LayerNorm(h, epsilon=cfg["layer_norm_eps"], rngs=rngs)
        self.dropout = nnx.Dropout(cfg["hidden_dropout_prob"], rngs=rngs)

    def __call__(self, input_ids, token_type_ids):
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class Layer(nnx.Module):
    """One post-LN transformer layer: self-attention, then a GELU MLP, each + residual + LN."""

    def __init__(self, cfg: dict, rngs: nnx.Rngs):
        h, m = cfg["hidden_size"], cfg["intermediate_size"]
        self.heads = cfg["num_attention_heads"]
        self.query = nnx.Linear(h, h, rngs=rngs)
        self.key = nnx.Linear(h, h, rngs=rngs)
        self.value = nnx.Linear(h, h, rngs=rngs)
        self.attn_out = nnx.Linear(h, h, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(h, epsilon=cfg["layer_norm_eps"], rngs=rngs)
        self.mlp_in = nnx.Linear(h, m, rngs=rngs)
        self.mlp_out = nnx.Linear(m, h, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(h, epsilon=cfg["layer_norm_eps"], rngs=rngs)
        self.attn_dropout = nnx.Dropout(cfg["attention_probs_dropout_prob"], rngs=rngs)
        self.dropout = nnx.Dropout(cfg["hidden_dropout_prob"], rngs=rngs)

    def __call__(self, x, bias):
        b, s, h = x.shape
        d = h // self.heads

        def split(t):  # (b, s, h) -> (b, heads, s, d)
            return t.reshape(b, s, self.heads, d).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(jnp.asarray(d, x.dtype)) + bias
        probs = self.attn_dropout(jax.nn.softmax(scores, axis=-1))
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        y = self.mlp_out(jax.nn.gelu(self.mlp_in(x), approximate=False))
        return self.mlp_norm(x + self.dropout(y))


class BertEncoder(nnx.Module):
    """BERT body: returns ``(last_hidden_state, pooler_output)`` like ``BertModel``."""

    def __init__(self, cfg: dict, rngs: nnx.Rngs):
        h = cfg["hidden_size"]
        self.embeddings = Embeddings(cfg, rngs)
        self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg["num_hidden_layers"])])
        self.pooler = nnx.Linear(h, h, rngs=rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        # Padding keys get the dtype's most negative value, as in transformers.
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, bias.astype(x.dtype))
        return x, jnp.tanh(self.pooler(x[:, 0]))


class BertClassifier(nnx.Module):
    """``BertForSequenceClassification``: pooler output -> dropout -> linear head."""

    def __init__(self, cfg: dict, num_labels: int, rngs: nnx.Rngs):
        self.bert = BertEncoder(cfg, rngs)
        self.dropout = nnx.Dropout(cfg["hidden_dropout_prob"], rngs=rngs)
        self.classifier = nnx.Linear(cfg["hidden_size"], num_labels, rngs=rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(pooled))


def _set(var: nnx.Variable, value: np.ndarray) -> None:
    old = var.get_value()
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"shape mismatch: model {old.shape}, checkpoint {value.shape}")
    var.set_value(jnp.asarray(value, old.dtype))


def _linear(module: nnx.Linear, w: dict, name: str) -> None:
    _set(module.kernel, w[name + ".weight"].T)  # torch stores (out, in)
    _set(module.bias, w[name + ".bias"])


def _norm(module: nnx.LayerNorm, w: dict, name: str) -> None:
    _set(module.scale, w[name + ".weight"])
    _set(module.bias, w[name + ".bias"])


def load_encoder_weights(encoder: BertEncoder, weights: dict[str, np.ndarray]) -> None:
    """Copies PyTorch ``BertModel`` weights (``embeddings.*``, ``encoder.layer.N.*``,
    ``pooler.*``; an optional ``bert.`` prefix is stripped) into ``encoder`` in place."""
    w = {k.removeprefix("bert."): v for k, v in weights.items()}
    e = encoder.embeddings
    _set(e.word.embedding, w["embeddings.word_embeddings.weight"])
    _set(e.position.embedding, w["embeddings.position_embeddings.weight"])
    _set(e.token_type.embedding, w["embeddings.token_type_embeddings.weight"])
    _norm(e.norm, w, "embeddings.LayerNorm")
    for i, layer in enumerate(encoder.layers):
        p = f"encoder.layer.{i}."
        _linear(layer.query, w, p + "attention.self.query")
        _linear(layer.key, w, p + "attention.self.key")
        _linear(layer.value, w, p + "attention.self.value")
        _linear(layer.attn_out, w, p + "attention.output.dense")
        _norm(layer.attn_norm, w, p + "attention.output.LayerNorm")
        _linear(layer.mlp_in, w, p + "intermediate.dense")
        _linear(layer.mlp_out, w, p + "output.dense")
        _norm(layer.mlp_norm, w, p + "output.LayerNorm")
    _linear(encoder.pooler, w, "pooler.dense")


_LOADED: dict[tuple[str, int, int], BertClassifier] = {}


def load_bert_classifier(
    path: str | os.PathLike, num_labels: int = 2, *, seed: int = 0
) -> BertClassifier:
    """A :class:`BertClassifier` with the pretrained body from ``path/model.safetensors``
    and a freshly initialised head (from ``seed``), as ``from_pretrained(num_labels=...)``.

    The first call per ``(path, num_labels, seed)`` builds the model (a random init of every
    entry, then the checkpoint read over the body); later calls return an ``nnx.clone`` of
    it: the same values in new variables, without initialising 22.7M entries again."""
    key = (str(Path(path).resolve()), num_labels, seed)
    if key not in _LOADED:
        from safetensors.numpy import load_file

        cfg = json.loads((Path(path) / "config.json").read_text())
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, got {cfg['hidden_act']!r}")
        model = BertClassifier(cfg, num_labels, nnx.Rngs(seed))
        load_encoder_weights(model.bert, load_file(str(Path(path) / "model.safetensors")))
        _LOADED[key] = model
    return nnx.clone(_LOADED[key])


def compare_with_torch(path: str, texts: list[str], max_length: int = 64) -> dict[str, float]:
    """Max abs differences between this port and ``transformers.BertModel`` in eval mode:
    ``hidden`` over the non-padding tokens, ``pooled`` over the pooler output, and ``logits``
    of the classifier with the same head weights copied from torch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    torch.manual_seed(0)
    ref = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    with torch.no_grad():
        t_in = {k: torch.from_numpy(v) for k, v in enc.items()}
        t_out = ref.bert(**t_in)
        t_hidden = t_out.last_hidden_state.numpy()
        t_pooled = t_out.pooler_output.numpy()
        t_logits = ref(**t_in).logits.numpy()

    model = load_bert_classifier(path, 2)
    model.eval()  # dropout off
    head = {k: v.detach().numpy() for k, v in ref.classifier.state_dict().items()}
    _linear(model.classifier, {"head." + k: v for k, v in head.items()}, "head")
    ids = jnp.asarray(enc["input_ids"])
    mask = jnp.asarray(enc["attention_mask"])
    types = jnp.asarray(enc["token_type_ids"])
    hidden, pooled = model.bert(ids, mask, types)
    logits = model(ids, mask, types)
    valid = np.asarray(enc["attention_mask"], bool)
    return {
        "hidden": float(np.max(np.abs(np.asarray(hidden)[valid] - t_hidden[valid]))),
        "pooled": float(np.max(np.abs(np.asarray(pooled) - t_pooled))),
        "logits": float(np.max(np.abs(np.asarray(logits) - t_logits))),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="BERT folder (default: offline MiniLM)")
    parser.add_argument("--n", type=int, default=8, help="Rotten Tomatoes test sentences")
    parser.add_argument("--tol", type=float, default=1e-4, help="fail above this max abs diff")
    args = parser.parse_args(argv)
    path = args.model or _common.minilm_path()
    texts = _common.take(_common.rotten_tomatoes()["test"], args.n).texts
    diffs = compare_with_torch(path, texts)
    worst = max(diffs.values())
    print(
        "max abs diff vs PyTorch: "
        + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items())
        + f" ({'OK' if worst <= args.tol else 'FAIL'}, tol {args.tol:g})"
    )
    if worst > args.tol:
        raise SystemExit(1)
    return diffs


if __name__ == "__main__":
    main()
