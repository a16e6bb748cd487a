"""Swapping adapters on the 200M bf16 Llama of ``benchmarks.memory``: a sparse summary's
attach + detach against reloading the state dict and against peft LoRA, in one run.

One process builds the model (``benchmarks.memory.build_model``), trains ``--steps`` real
steps of ID3 (budget 0.5%, ``stream_grads=True``, ``max_steps=--steps`` so the whole budget
is spent) to get a real summary and the training step's time, then times, each ``--repeat``
times (median):

* ``attach + detach``: ``torch_bridge.attach(model, summary)`` then ``handle.detach()``; the
  model is checked to be bit-for-bit the base afterwards. Extra memory: the bytes the
  handle keeps (old values + indices), and the resident-memory high-water mark over the swap.
* ``load_state_dict (in memory)``: ``model.load_state_dict(sd)`` from a state dict held in
  memory (which costs a whole copy of the model to hold).
* ``load_state_dict (safetensors file)``: ``safetensors.torch.load_file`` of the base
  checkpoint, then ``load_state_dict``.
* peft LoRA r=16 on all linear layers, two adapters: ``set_adapter`` (a switch; inference then
  runs the LoRA matmuls on every forward), ``merge_adapter`` + ``unmerge_adapter`` (the merged
  swap, which restores the base only up to rounding), and ``merge_and_unload`` (once: it
  removes the adapters).

Run::

    python -m benchmarks.adapter_swap --out benchmarks/results/cpu/adapter_swap

(about 6 minutes on 2 loaded CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.memory import BUDGET_FRAC, SEQ, _git_commit, build_model
from benchmarks.proc_memory import hwm, reset_hwm, rss


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _timed(fn, repeat: int) -> tuple[float, int]:
    """Median wall time of ``fn()`` and the largest resident high-water mark rise over it."""
    times, rise = [], 0
    for _ in range(repeat):
        gc.collect()
        before = rss()
        reset_hwm()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        rise = max(rise, hwm() - before)
    return _median(times), rise


def _max_abs_diff(model, sd) -> float:
    import torch

    worst = 0.0
    for k, v in model.state_dict().items():
        worst = max(worst, float((v.float() - sd[k].float()).abs().max()))
    del torch
    return worst


def run(size: str = "200m", steps: int = 3, repeat: int = 5) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    import torch_bridge

    torch.manual_seed(0)
    model = build_model(size)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    budget = max(1, int(n_params * BUDGET_FRAC))
    opt = torch_bridge.get_selective_optimizer(torch.optim.AdamW, "id3")(
        model.parameters(), lr=1e-4, budget=budget, max_steps=steps, stream_grads=True)
    gen = torch.Generator().manual_seed(1)
    step_times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=gen)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
    step_s = _median(step_times[1:] or step_times)
    summary = opt.get_summary(model)
    del opt
    model.load_state_dict(base_sd)  # back to the base model
    model.eval()
    gc.collect()
    rows = []

    def swap():
        torch_bridge.attach(model, summary).detach()

    h = torch_bridge.attach(model, summary)
    kept = h.nbytes
    h.detach()
    t, rise = _timed(swap, repeat)
    exact = all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())
    rows.append({"case": "summary attach + detach", "swap_s": t, "peak_rise": rise,
                 "kept_bytes": kept, "restores_bits": exact})
    t, rise = _timed(lambda: model.load_state_dict(base_sd), repeat)
    sd_bytes = sum(v.numel() * v.element_size() for v in base_sd.values())
    rows.append({"case": "load_state_dict (in memory)", "swap_s": t, "peak_rise": rise,
                 "kept_bytes": sd_bytes, "restores_bits": True})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "base.safetensors")
        save_file(base_sd, path)
        t, rise = _timed(lambda: model.load_state_dict(load_file(path)), repeat)
    rows.append({"case": "load_state_dict (safetensors file)", "swap_s": t, "peak_rise": rise,
                 "kept_bytes": 0, "restores_bits": True})
    base_sd.clear()  # the in-memory copy is no longer needed
    gc.collect()

    from peft import LoraConfig, get_peft_model

    base_copy = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                            init_lora_weights=False), adapter_name="a")
    lora.add_adapter("b", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                     init_lora_weights=False))
    lora_bytes = sum(p.numel() * p.element_size() for n, p in lora.named_parameters()
                     if "lora_" in n) // 2
    names = iter(["a", "b"] * repeat)
    t, rise = _timed(lambda: lora.set_adapter(next(names)), repeat)
    rows.append({"case": "peft LoRA set_adapter (unmerged)", "swap_s": t, "peak_rise": rise,
                 "kept_bytes": lora_bytes, "restores_bits": True})

    def merged_swap():
        lora.merge_adapter()
        lora.unmerge_adapter()

    t, rise = _timed(merged_swap, repeat)
    base_model = lora.get_base_model()
    diff = max(float((v.float() - base_copy[k].float()).abs().max())
               for k, v in base_model.state_dict().items() if k in base_copy and "lora_" not in k)
    rows.append({"case": "peft LoRA merge_adapter + unmerge_adapter", "swap_s": t,
                 "peak_rise": rise, "kept_bytes": lora_bytes, "restores_bits": diff == 0.0,
                 "max_abs_diff": diff})
    t, rise = _timed(lambda: copy.copy(lora).merge_and_unload(), 1)
    rows.append({"case": "peft LoRA merge_and_unload (once)", "swap_s": t, "peak_rise": rise,
                 "kept_bytes": 0, "restores_bits": False})
    for r in rows:
        r["of_step"] = r["swap_s"] / step_s
    return {"size": size, "params": n_params, "budget": budget,
            "budget_used": summary["budget_used"], "step_s": step_s, "step_times": step_times,
            "rows": rows, "repeat": repeat, "commit": _git_commit(),
            "load": os.getloadavg()[0], "threads": torch.get_num_threads()}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def markdown(result: dict[str, Any], command: str) -> str:
    summary_row = result["rows"][0]
    lines = [
        "# Swapping adapters on a bf16 Llama (torch)", "",
        f"Command: `{command}`  ",
        f"Commit: {result['commit']}; machine: AMD EPYC, 2 cores shared with other jobs "
        f"(1-minute load {result['load']:.1f} at the end), {result['threads']} torch threads.",
        "",
        f"{result['size']} ({result['params'] / 1e6:.1f}M parameters, bf16), summary from "
        f"{len(result['step_times'])} ID3 steps (budget {result['budget']:,} = 0.5%, "
        f"{result['budget_used']:,} used, stream_grads=True). Training step (median of steps "
        f"2..n, sequence {SEQ}, batch 1): {result['step_s']:.2f} s. Swap: median of "
        f"{result['repeat']} runs. Peak rise: resident high-water mark over the swap minus the "
        "resident memory before it. Kept: memory the method holds between swaps (summary: the "
        "old values and indices; in-memory reload: the base state dict; LoRA: one adapter).",
        "",
        "| case | swap | of a training step | peak rise | kept | restores base bit for bit |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        extra = f" (max abs diff {r['max_abs_diff']:.2g})" if "max_abs_diff" in r else ""
        lines.append(f"| {r['case']} | {r['swap_s'] * 1e3:.1f} ms | {r['of_step']:.2%} | "
                     f"{_mib(r['peak_rise'])} | {_mib(r['kept_bytes'])} | "
                     f"{'yes' if r['restores_bits'] else 'no'}{extra}"
                     f"{' (removes the adapters)' if 'unload' in r['case'] else ''} |")
    reload = result["rows"][1]
    lines += [
        "",
        f"- Target swap <= 1% of a training step: {summary_row['of_step']:.2%} "
        f"({'met' if summary_row['of_step'] <= 0.01 else 'NOT met'}).",
        f"- Summary swap vs in-memory reload: {reload['swap_s'] / summary_row['swap_s']:.1f}x "
        f"faster, keeping {summary_row['kept_bytes'] / reload['kept_bytes']:.2%} of its memory "
        "(O(budget)).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="200m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the whole run (training step and every swap)")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run(args.size, args.steps, args.repeat)
    cmd = "python -m benchmarks.adapter_swap" + "".join(
        f" --{k} {v}" for k, v in (("size", args.size), ("steps", args.steps),
                                   ("repeat", args.repeat), ("threads", args.threads),
                                   ("out", args.out)) if v is not None)
    text = markdown(result, cmd)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
