"""Torch rows of the benchmark: the bridge's ID3 step (dense and ``compact=True`` inner state)
against a dense torch AdamW step (the fastest of its for-loop, foreach and fused forms) and against the reference package ``selective-optimizers==0.4``.

The reference is installed at run time into a temporary folder
(:func:`benchmarks.runs.install_reference`) and run in a subprocess started in that folder,
so its ``selective_optimizers`` comes first on ``sys.path`` (its code is never copied here; its
package name is the same as our compatibility package, hence the separate process). Each
process also times its own dense AdamW step, so every ratio compares steps timed in the same
process.

Each row also reports the bridge's JAX compile time (tracing, lowering and XLA compilation of
the shared method's update, summed from ``jax.monitoring``'s compile events while the
optimizer takes its steps) and how many XLA compilations that was: one per optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

import numpy as np

from benchmarks import runs

# jax.monitoring duration events of one jit compilation: trace, lower, XLA compile
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compile_time():
    """Yields a dict that collects the compile seconds and XLA compilations of the bridge's
    selection update (``MethodRunner._update*``) in the block."""
    import jax

    out = {"seconds": 0.0, "compiles": 0}

    def listen(event, secs, fun_name="", **kw):
        if event in _COMPILE_EVENTS and "_update" in str(fun_name):  # the method's update only
            out["seconds"] += secs
            out["compiles"] += event == _COMPILE_EVENTS[-1]

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield out
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _model(width: int, layers: int, device: str = "cpu"):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)


def _state_bytes(opt) -> int:
    if hasattr(opt, "state_nbytes"):
        return opt.state_nbytes()
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if hasattr(v, "element_size"))


def _time_steps(opt, params, repeats: int, warmup: int = 2, sync=lambda: None) -> float:
    import torch

    g = torch.Generator(device=params[0].device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=p.device) * 1e-2
    for _ in range(warmup):
        opt.step()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def _dense(width, layers, repeats, device="cpu", **adamw_kw):
    import torch

    model = _model(width, layers, device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, **adamw_kw)
    ms = _time_steps(opt, params, repeats, sync=_sync(device))
    _dense.last_state_bytes = _state_bytes(opt)
    return ms


ADAMW_VARIANTS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _dense_best(width, layers, repeats, device="cpu"):
    """The dense AdamW baseline at its best: every implementation of :data:`ADAMW_VARIANTS`
    timed, the fastest kept (its name in ``_dense_best.last_variant``)."""
    best = None
    for name, kw in ADAMW_VARIANTS.items():
        try:
            ms = _dense(width, layers, repeats, device, **kw)
        except (RuntimeError, TypeError):  # e.g. fused AdamW not built for this device
            continue
        if best is None or ms < best[0]:
            best = (ms, name)
    _dense_best.last_variant = best[1]
    return best[0]


def _sync(device):
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _selective(get_selective_optimizer, width, layers, repeats, budget_frac, max_steps, device="cpu", **kw):
    import torch

    model = _model(width, layers, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    opt = cls(params, lr=1e-3, weight_decay=0.0, budget=max(1, int(n * budget_frac)), max_steps=max_steps, **kw)
    ms = _time_steps(opt, params, repeats, sync=_sync(device))
    _selective.last_state_bytes = _state_bytes(opt)
    return ms


def install_reference() -> str | None:
    """The reference in a temporary folder (:func:`benchmarks.runs.install_reference`), or None."""
    try:
        return str(runs.install_reference(timeout=240))
    except runs.ReferenceUnavailable as e:
        print(f"[bench] {e}", flush=True)
        return None


def run_reference(target, width, layers, repeats, budget_frac, max_steps, device="cpu", timeout=900,
                  threads: int | None = None) -> dict | None:
    """Reference ID3 step and a dense AdamW step, timed in one fresh process."""
    code = (
        "from benchmarks.common import steady_malloc; steady_malloc();"
        + (f"import torch; torch.set_num_threads({int(threads)});" if threads else "")
        + "import json;"
        "import selective_optimizers.wrap as w;"
        "assert w.__file__.startswith({t!r}), w.__file__;"
        "from benchmarks.torch_rows import _selective, _dense_best;"
        "print(json.dumps({{'reference_id3_ms': _selective(w.get_selective_optimizer, {a}, verify=False),"
        "'dense_ms': _dense_best({d}), 'dense_variant': _dense_best.last_variant}}))"
    ).format(
        t=target,
        a=f"{width}, {layers}, {repeats}, {budget_frac}, {max_steps}, {device!r}",
        d=f"{width}, {layers}, {repeats}, {device!r}",
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           **runs.reference_process(target))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(sizes: str, *, quick: bool, repeats: int, budget_frac: float = 0.01, max_steps: int = 100,
        reference: bool = True, threads: int | None = None) -> dict:
    """Torch rows for every size; bridge and dense in this process, the reference in another.

    Every row is a median over 3 alternating rounds of ``repeats`` timed steps each; ID3 steps
    are timed while it is still selecting (its most expensive phase). ``threads`` sets torch's
    intra-op threads in both processes (on a shared machine, 2 OpenMP threads that spin while
    the other is descheduled can make a 5 ms step take 400 ms; 1 thread avoids that)."""
    try:
        import torch  # noqa: F401

        from torch_bridge import get_selective_optimizer
    except ImportError as e:
        return {"skipped": f"torch bridge not available: {e}"}
    from benchmarks.common import steady_malloc

    steady_malloc()  # see its docstring: same allocator behaviour for every case
    if threads:
        import torch

        torch.set_num_threads(threads)
    target = install_reference() if reference else None
    out = {"torch_threads": threads or __import__("torch").get_num_threads(), "reference": "selective-optimizers==0.4" if target else ("not installable here" if reference else "not run"), "sizes": []}
    for spec in sizes.split(","):
        width, layers = (int(v) for v in spec.lower().split("x"))
        row = {"width": width, "layers": layers, "params": layers * (width * width + width)}
        dense, bridge, compact, frozen, compile_s, compiles = [], [], [], [], [], []
        variants = []
        for _ in range(3):  # alternate, take medians
            dense.append(_dense_best(width, layers, repeats))  # fastest of for-loop, foreach, fused
            variants.append(_dense_best.last_variant)
            with compile_time() as ct:
                bridge.append(_selective(get_selective_optimizer, width, layers, repeats, budget_frac,
                                         max_steps, compact=False))
            compile_s.append(ct["seconds"])
            compiles.append(ct["compiles"])
            row["bridge_state_bytes"] = _selective.last_state_bytes
            compact.append(_selective(get_selective_optimizer, width, layers, repeats, budget_frac, max_steps,
                                      compact=True))
            row["compact_state_bytes"] = _selective.last_state_bytes
            frozen.append(_selective(get_selective_optimizer, width, layers, repeats, budget_frac, 1,
                                     compact=True))  # max_steps=1: every timed step is after it
        row["dense_state_bytes"] = _dense.last_state_bytes
        row["budget"] = max(1, int(row["params"] * budget_frac))
        row["dense_adamw_ms"] = float(np.median(dense))
        row["dense_adamw_variant"] = max(set(variants), key=variants.count)
        row["bridge_id3_ms"] = float(np.median(bridge))
        row["compact_id3_ms"] = float(np.median(compact))
        row["bridge_over_dense"] = row["bridge_id3_ms"] / row["dense_adamw_ms"]
        row["compact_over_dense"] = row["compact_id3_ms"] / row["dense_adamw_ms"]
        row["compact_frozen_ms"] = float(np.median(frozen))
        row["bridge_compile_s"] = float(np.median(compile_s))
        row["bridge_xla_compiles"] = max(compiles)
        row["compact_frozen_over_dense"] = row["compact_frozen_ms"] / row["dense_adamw_ms"]
        if target:
            ref = run_reference(target, width, layers, repeats, budget_frac, max_steps, threads=threads)
            row["reference"] = ref
            if ref and "reference_id3_ms" in ref:
                row["reference_over_dense"] = ref["reference_id3_ms"] / ref["dense_ms"]
                row["reference_over_bridge"] = row["reference_over_dense"] / row["bridge_over_dense"]
                row["reference_over_compact"] = row["reference_over_dense"] / row["compact_over_dense"]
        out["sizes"].append(row)
    return out


def markdown(t: dict) -> str:
    if "skipped" in t:
        return f"Torch rows skipped: {t['skipped']}\n"
    lines = [
        f"### Torch: ID3 with torch.optim.AdamW inner (budget 1%), reference {t['reference']}, "
        f"{t.get('torch_threads', '?')} torch thread(s)",
        "",
        "| params | dense AdamW ms | ID3 ms (dense / compact) | ID3 / dense AdamW (dense / compact) "
        "| reference / dense AdamW | reference ID3 / ours (dense / compact) "
        "| state MB: AdamW / ID3 dense / ID3 compact | compact ID3 after max_steps / dense AdamW "
        "| ID3 compile s (XLA compiles) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mb = 1e-6
    for r in t["sizes"]:
        ref = f"{r['reference_over_dense']:.2f}x" if "reference_over_dense" in r else "n/a"
        rb = (f"{r['reference_over_bridge']:.1f}x / {r['reference_over_compact']:.1f}x"
              if "reference_over_bridge" in r else "n/a")
        compile_cell = (f"{r['bridge_compile_s']:.2f} ({r['bridge_xla_compiles']})"
                        if "bridge_compile_s" in r else "n/a")  # rows saved before it was timed
        lines.append(
            f"| {r['params'] / 1e6:.2f}M | {r['dense_adamw_ms']:.2f} | {r['bridge_id3_ms']:.2f} / "
            f"{r['compact_id3_ms']:.2f} | {r['bridge_over_dense']:.2f}x / {r['compact_over_dense']:.2f}x | "
            f"{ref} | {rb} | {r['dense_state_bytes'] * mb:.1f} / {r['bridge_state_bytes'] * mb:.1f} / "
            f"{r['compact_state_bytes'] * mb:.1f} | {r['compact_frozen_over_dense']:.2f}x | "
            f"{compile_cell} |"
        )
    lines.append("")
    lines.append("Dense AdamW is the fastest of torch's for-loop, foreach and fused implementations, "
                 "timed in every round (the fastest per size: "
                 + ", ".join(f"{r['params'] / 1e6:.2f}M {r.get('dense_adamw_variant', 'for-loop')}"
                             for r in t["sizes"]) + "). "
                 "Reference ratios are timed against a dense AdamW step in the reference's own process. "
                 "ID3 steps are timed while it is still selecting; its compile time (JAX tracing, "
                 "lowering and XLA compilation of the selection update, once per optimizer) is "
                 "not part of the step times.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512x4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true", help="skip selective-optimizers==0.4")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args()
    print(markdown(run(a.sizes, quick=False, repeats=a.repeats, reference=not a.no_reference,
                       threads=a.threads)))
