"""Shared pieces of the CPU and GPU benchmarks: models, timing, memory, state size.

Writing results (with the commit they ran on) and installing the 0.4 reference live in the
jax-free :mod:`benchmarks.runs` and are re-exported here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.runs import (  # noqa: F401 - re-exported: one import point for benchmarks
    ReferenceUnavailable,
    install_reference,
    reference_process,
    run_info,
    run_line,
    write_json,
)


def steady_malloc() -> bool:
    """Makes glibc serve large blocks from its heap (no per-step page faults); True if set.

    glibc's dynamic mmap threshold starts at 128 KiB, so in a fresh process every large
    temporary (torch's foreach AdamW allocates several per step) is a new mmap whose pages
    fault in again on every step; measured on the 2-core CPU at 25M parameters, a dense torch
    AdamW step takes about 92 ms in a fresh process and 34 ms once the threshold has grown.
    Fixing the threshold (and the trim threshold) puts every case, baselines included, at
    its steady state, whatever ran before it in the process.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        return False


def mlp_params(width: int, layers: int, seed: int = 0, dtype=jnp.float32) -> dict:
    """A stack of ``layers`` dense layers ``width x width`` with biases (random init)."""
    key = jax.random.key(seed)
    params = {}
    for i in range(layers):
        k = jax.random.fold_in(key, i)
        params[f"layer_{i:02d}"] = {
            "kernel": (jax.random.normal(k, (width, width), dtype) * (1.0 / np.sqrt(width))).astype(dtype),
            "bias": jnp.zeros((width,), dtype),
        }
    return params


def fake_grads(params: Any, seed: int = 1) -> Any:
    """Fixed random gradients shaped like ``params`` (the optimizer step is what we time)."""
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.key(seed)
    return treedef.unflatten(
        [jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) * 1e-2 for i, x in enumerate(leaves)]
    )


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def tree_bytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def make_step(tx: optax.GradientTransformation) -> Callable:
    """jit(update + apply_updates) with params and state donated, as in a training loop."""

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(1, 2))


def compiled_memory(step: Callable, grads, state, params) -> int | None:
    """XLA's compiled memory analysis of one step: arguments + outputs + temporaries - aliased."""
    try:
        m = step.lower(grads, state, params).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def summary_bytes(params: Any, state: Any) -> int | None:
    """Bytes on disk of the orbax summary, if ``optax_selective.summary`` is available."""
    try:
        from optax_selective.summary import make_summary, save_summary
    except ImportError:
        return None
    folder = tempfile.mkdtemp(prefix="osel_bench_")
    try:
        path = os.path.join(folder, "summary")
        save_summary(path, make_summary(params, state))
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def median_ms(samples: list[float]) -> float:
    return float(np.median(samples) * 1e3)


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t
