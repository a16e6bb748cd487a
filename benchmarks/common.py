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


# How a training step may take its arguments and donate them. XLA's buffer assignment
# depends on both: optax.adamw at 200M bf16 compiles with 766 MiB of temporaries as
# ``step(grads, state, params)`` donating (state, params) and with none as
# ``step(params, state, grads)`` donating (params, state). Every case is compiled in each
# layout and measured in its best one (lowest compiled peak), so no case, baseline or
# selective, is handicapped by the argument order.
STEP_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "gsp/sp": (("grads", "state", "params"), (1, 2)),
    "psg/ps": (("params", "state", "grads"), (0, 1)),
    "psg/all": (("params", "state", "grads"), (0, 1, 2)),
}
LAYOUT_TEXT = (
    "layout gsp/sp = `step(grads, state, params)` donating state and params; psg/ps = "
    "`step(params, state, grads)` donating params and state; psg/all = the same donating the "
    "gradients too"
)
DEFAULT_LAYOUT = "psg/ps"


def make_step(tx: optax.GradientTransformation, layout: str = DEFAULT_LAYOUT) -> Callable:
    """jit(update + apply_updates) in one of :data:`STEP_LAYOUTS`, called ``step(grads, state,
    params)`` whatever the layout (the jitted function is ``step.jitted``, taking the layout's
    order)."""
    order, donate = STEP_LAYOUTS[layout]

    def body(*args):
        a = dict(zip(order, args))
        updates, state = tx.update(a["grads"], a["state"], a["params"])
        return optax.apply_updates(a["params"], updates), state

    jitted = jax.jit(body, donate_argnums=donate)

    def step(grads, state, params):
        a = {"grads": grads, "state": state, "params": params}
        return jitted(*(a[k] for k in order))

    def lower(grads, state, params):
        a = {"grads": grads, "state": state, "params": params}
        return jitted.lower(*(a[k] for k in order))

    step.jitted, step.lower, step.layout = jitted, lower, layout
    step.donates_grads = order.index("grads") in donate
    return step


def peak_of(memory_analysis) -> int:
    """arguments + outputs + temporaries - aliased (donated) bytes."""
    m = memory_analysis
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def best_layout(tx: optax.GradientTransformation, grads, state, params) -> tuple[str, list[dict]]:
    """The layout of :data:`STEP_LAYOUTS` with the lowest compiled peak for ``tx`` (ties: the
    first), and every layout's ``{"layout", "peak_bytes", "temp_bytes", "xla_peak_bytes"}``.
    Arguments may be arrays or ``jax.ShapeDtypeStruct``s. Where the backend reports no memory
    analysis, the default layout with ``peak_bytes`` None."""
    import warnings

    tried = []
    for layout in STEP_LAYOUTS:
        with warnings.catch_warnings():  # donated grads that cannot alias an output: expected
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            try:
                m = make_step(tx, layout).lower(grads, state, params).compile().memory_analysis()
            except Exception:  # noqa: BLE001 - not every backend reports it
                m = None
        if m is None:
            return DEFAULT_LAYOUT, [{"layout": DEFAULT_LAYOUT, "peak_bytes": None, "temp_bytes": None,
                                     "xla_peak_bytes": None}]
        xla_peak = getattr(m, "peak_memory_in_bytes", None)
        tried.append({"layout": layout, "peak_bytes": peak_of(m), "temp_bytes": int(m.temp_size_in_bytes),
                      "xla_peak_bytes": None if xla_peak is None else int(xla_peak)})
    best = min(tried, key=lambda t: t["peak_bytes"])
    return best["layout"], tried


def compiled_memory(step: Callable, grads, state, params) -> int | None:
    """XLA's compiled memory analysis of one step: arguments + outputs + temporaries - aliased."""
    try:
        return peak_of(step.lower(grads, state, params).compile().memory_analysis())
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
