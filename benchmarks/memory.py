"""Peak memory of fine-tuning a Llama-shaped LM in bf16: ``python -m benchmarks.memory``.

Every case runs in its own subprocess: it builds a ``transformers`` ``LlamaForCausalLM`` from a
``LlamaConfig`` directly in bfloat16 (random init), turns on gradient checkpointing, reads its
resident memory, resets the kernel's high-water mark (``/proc/self/clear_refs``) and runs a
few causal-LM steps (sequence 256, batch 1). *Extra peak* is the high-water mark of resident
memory during the steps minus the resident memory after building the model, so it counts
gradients, optimizer state, activations and every temporary of the step. Ratios are to full
``torch.optim.AdamW`` at its best (for each measure the best of its for-loop, fused and, when
asked for, foreach forms measured in the same run) and to peft LoRA.

Cases (torch): full AdamW; peft LoRA r=16 on all linear layers; ID3 (budget 0.5%) with the
compact state; ID3 compact with ``stream_grads=True``, without and with
``torch_bridge.chunk_weight_grads`` on the LM head and the embedding; PaFI compact streaming; the reference
``selective-optimizers==0.4`` ID3 (installed with pip into a temporary folder, run from there).
JAX rows come from :mod:`benchmarks.memory_jax` when that module exists.

Example::

    python -m benchmarks.memory --sizes 200m            # about 5 minutes on 2 CPU cores
    python -m benchmarks.memory --sizes 200m,1b --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

from benchmarks import runs
from benchmarks.proc_memory import MALLOC_ENV, hwm, reset_hwm, rss

SIZES: dict[str, dict[str, int]] = {
    # name: LlamaConfig fields (16 / 4 heads in the two large ones, as in the issue)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, vocab_size=1000,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1408, vocab_size=32000,
                  num_attention_heads=8, num_key_value_heads=2),
    "200m": dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, vocab_size=32000,
                 num_attention_heads=16, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, vocab_size=32000,
               num_attention_heads=16, num_key_value_heads=4),
}
CASES = ("adamw", "adamw_fused", "lora", "id3_compact", "id3_stream", "id3_stream_rows", "pafi_stream",
         "reference_id3")
LABELS = {
    "adamw": "full torch.optim.AdamW",
    "adamw_fused": "full torch.optim.AdamW(fused=True)",
    "adamw_foreach": "full torch.optim.AdamW(foreach=True)",
    "lora": "peft LoRA r=16, all linear layers",
    "id3_compact": "ID3 0.5%, compact",
    "id3_stream": "ID3 0.5%, compact, stream_grads=True",
    "id3_stream_rows": "ID3 0.5%, compact, stream_grads=True + chunk_weight_grads",
    "pafi_stream": "PaFI 0.5%, compact, stream_grads=True",
    "pafi_stream_rows": "PaFI 0.5%, compact, stream_grads=True + chunk_weight_grads",
    "reference_id3": "reference selective-optimizers==0.4 ID3 0.5%",
    "id3_dense": "ID3 0.5%, compact=False",
}
BUDGET_FRAC = 0.005
MAX_STEPS = 100  # ID3 spends the budget over 100 steps: k_t = budget / 100 per step
# Run-wide settings (command-line flags, handed to every case's process): --no-checkpointing,
# --max-steps and --id3-eps give the form a new user tries first (no gradient checkpointing,
# ID3 over few steps: a large k_t per step).
OPTIONS: dict[str, Any] = {"checkpointing": True, "max_steps": MAX_STEPS, "id3_eps": None}
SEQ = 256


# ------------------------------------------------------------------------------ one case


def _median_after_first(xs: list[float]) -> float:
    rest = xs[1:] or xs
    return sorted(rest)[len(rest) // 2]


def build_model(size: str, seed: int = 0, checkpointing: bool = True):
    """``LlamaForCausalLM`` of preset ``size``, created in bfloat16, gradient checkpointing on
    unless ``checkpointing=False``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no float32 copy of the weights, ever
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def _prepare(case: str, model, reference: str | None):
    """The model as the case trains it (peft-wrapped for LoRA), before any optimizer."""
    if case == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if case.endswith("_rows"):  # the LM head's and embedding's gradients in row blocks
        from torch_bridge import chunk_weight_grads

        cfg = model.config
        chunk_weight_grads(model, min_numel=cfg.vocab_size * cfg.hidden_size)
    if case == "reference_id3":  # the child runs in the reference's folder (runs.reference_process)
        import selective_optimizers.wrap as wrap

        assert wrap.__file__.startswith(reference), wrap.__file__
    return model


def _optimizer(case: str, model, steps: int):
    import torch

    n = sum(p.numel() for p in model.parameters())
    budget = max(1, int(n * BUDGET_FRAC))
    if case in ("adamw", "adamw_fused", "adamw_foreach", "lora"):
        kw = {"adamw_fused": {"fused": True}, "adamw_foreach": {"foreach": True}}.get(case, {})
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **kw)
    if case == "reference_id3":
        import selective_optimizers.wrap as wrap

        cls = wrap.get_selective_optimizer(torch.optim.AdamW, "id3")
        return cls(model.parameters(), lr=1e-4, budget=budget, max_steps=steps)
    from torch_bridge import get_selective_optimizer

    method = case.split("_")[0]
    kw: dict[str, Any] = {"budget": budget}
    if method == "id3":
        kw["max_steps"] = OPTIONS["max_steps"]  # every measured step is a selection step
        if OPTIONS["id3_eps"] is not None:
            kw["eps"] = OPTIONS["id3_eps"]
    if "_stream" in case:
        kw["stream_grads"] = True
    kw["compact"] = case != "id3_dense"
    cls = get_selective_optimizer(torch.optim.AdamW, method)
    return cls(model.parameters(), lr=1e-4, **kw)


def state_bytes(opt) -> int:
    """Optimizer-state bytes: ``state_nbytes()`` where the optimizer has it (ours), else the
    tensors in ``opt.state`` (dense AdamW, LoRA, the reference; its masks are not counted)."""
    import torch

    if hasattr(opt, "state_nbytes"):
        return int(opt.state_nbytes())
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def run_case(case: str, size: str, steps: int, reference: str | None = None) -> dict:
    """Runs one case in this process and returns its measurements."""
    import torch

    if case != "reference_id3":
        import torch_bridge  # noqa: F401  (jax imported before the baseline, like torch)
    model = _prepare(case, build_model(size, checkpointing=OPTIONS["checkpointing"]), reference)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (1, SEQ), generator=gen) for _ in range(steps)]
    gc.collect()
    base = rss()  # after building the model: the optimizer's construction counts
    exact = reset_hwm()
    t0 = time.perf_counter()
    opt = _optimizer(case, model, steps)
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    times, cpu, losses = [], [], []
    for ids in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(loss))
    peak = hwm()
    out = {
        "case": case, "size": size, "params": n_params, "steps": steps,
        "rss_after_build": base, "extra_peak": peak - base, "hwm_reset": exact,
        "step_s": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0],
        "step_cpu_s": _median_after_first(cpu), "load": os.getloadavg()[0],
        "first_step_s": times[0], "init_s": init_s, "state_bytes": state_bytes(opt), "losses": losses,
    }
    if hasattr(opt, "get_budget_used"):
        out["budget_used"] = int(opt.get_budget_used())
    return out


# ------------------------------------------------------------------------------ the run


def _child(case: str, size: str, steps: int, reference: str | None, timeout: int,
           malloc: str = "fixed") -> dict:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", case, "--sizes", size,
           "--steps", str(steps), "--max-steps", str(OPTIONS["max_steps"])]
    if not OPTIONS["checkpointing"]:
        cmd.append("--no-checkpointing")
    if OPTIONS["id3_eps"] is not None:
        cmd += ["--id3-eps", repr(OPTIONS["id3_eps"])]
    if reference:
        cmd += ["--reference", reference]
    env, cwd = dict(os.environ, PYTHONPATH=here), here
    if reference:  # the reference's selective_optimizers first on sys.path, ours for the rest
        where = runs.reference_process(reference)
        env, cwd = where["env"], where["cwd"]
    if malloc == "fixed":
        env.update(MALLOC_ENV)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"case": case, "size": size, "error": f"timed out after {timeout}s"}
    if r.returncode != 0:
        return {"case": case, "size": size, "error": r.stderr.strip()[-800:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


ADAMW_FORMS = ("adamw", "adamw_fused", "adamw_foreach")


def _ratios(rows: list[dict]) -> None:
    """Ratios to AdamW at its best, each measure on its own (the lowest peak, the fastest step
    and the least CPU among the AdamW forms measured: for-loop, fused, foreach), and to LoRA."""
    by = {r["case"]: r for r in rows if "error" not in r}
    forms = [by[c] for c in ADAMW_FORMS if c in by]
    best = {}
    if forms:
        best = {"extra_peak": min(forms, key=lambda b: b["extra_peak"]),
                "step_s": min(forms, key=lambda b: b["step_s"]),
                "step_cpu_s": min(forms, key=lambda b: b.get("step_cpu_s", float("inf"))),
                "state_bytes": min(forms, key=lambda b: b["state_bytes"])}
    for r in rows:
        if "error" in r:
            continue
        for base in ("adamw", "lora"):
            if base == "adamw" and not best:
                continue
            if base == "lora" and base not in by:
                continue
            b = best if base == "adamw" else dict.fromkeys(("extra_peak", "step_s", "step_cpu_s", "state_bytes"), by[base])
            r[f"peak_over_{base}"] = r["extra_peak"] / b["extra_peak"]["extra_peak"]
            r[f"step_over_{base}"] = r["step_s"] / b["step_s"]["step_s"]
            if "step_cpu_s" in r and "step_cpu_s" in b["step_cpu_s"]:
                r[f"cpu_over_{base}"] = r["step_cpu_s"] / b["step_cpu_s"]["step_cpu_s"]
            r[f"state_over_{base}"] = (r["state_bytes"] / b["state_bytes"]["state_bytes"]
                                       if b["state_bytes"]["state_bytes"] else None)
            if base == "adamw":
                r["adamw_best"] = {k: v["case"] for k, v in best.items()}


def _jax_rows(sizes: list[str], steps: int) -> tuple[str, Any]:
    """The JAX rows (XLA compiled memory of one step) from ``benchmarks.memory_jax``, which
    the JAX side of the project provides; reported as missing where it is not there."""
    del steps  # compiled memory analysis: nothing runs
    if importlib.util.find_spec("benchmarks.memory_jax") is None:
        return "benchmarks/memory_jax.py not present on this branch", None
    from benchmarks import memory_jax

    if not hasattr(memory_jax, "jax_rows"):
        return "benchmarks.memory_jax has no jax_rows(preset)", None
    rows = {}
    for size in sizes:
        try:
            rows[size] = memory_jax.jax_rows(size)
        except (KeyError, ValueError) as e:  # a preset the JAX side does not define
            rows[size] = f"not analysed: {e}"
    return "ok", rows


def _git_commit() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def run(sizes: list[str], cases: list[str], steps: int, timeout: int = 3600,
        jax_rows: bool = True, malloc: str = "fixed", log=print, save=None) -> dict:
    reference = None
    if "reference_id3" in cases:
        try:
            reference = str(runs.install_reference())
        except runs.ReferenceUnavailable as e:
            log(f"[memory] {e}")
    result: dict[str, Any] = {
        "command": "python -m " + " ".join(["benchmarks.memory", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(), "budget_frac": BUDGET_FRAC, "seq": SEQ, "batch": 1,
        "steps": steps, "max_steps": OPTIONS["max_steps"],
        "checkpointing": OPTIONS["checkpointing"], "id3_eps": OPTIONS["id3_eps"],
        "malloc": " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) if malloc == "fixed" else "glibc default",
        "sizes": {},
    }
    for size in sizes:
        rows = []
        for case in cases:
            if case == "reference_id3" and reference is None:
                rows.append({"case": case, "size": size, "error": "could not install selective-optimizers==0.4"})
                continue
            r = _child(case, size, steps, reference, timeout, malloc)
            rows.append(r)
            log(f"[memory] {size} {case}: " + (r.get("error", "")[-300:] or
                f"extra peak {r['extra_peak'] / 2**20:,.0f} MiB, step {r['step_s']:.2f} s, "
                f"state {r['state_bytes'] / 2**20:,.1f} MiB"))
        _ratios(rows)
        result["sizes"][size] = rows
        if save is not None:  # after every size, so a long run keeps what it measured
            save(result)
    if jax_rows:
        status, rows = _jax_rows(sizes, steps)
        result["jax"] = {"status": status, "rows": rows}
    return result


TARGETS = (  # (case, baseline, measure, at most): the targets, bf16 on this CPU
    ("id3_compact", "adamw", "peak", 0.6),
    ("id3_compact", "adamw", "step", 1.5),
    ("pafi_stream", "lora", "peak", 1.35),
    ("pafi_stream_rows", "lora", "peak", 1.35),
    ("id3_stream", "lora", "peak", 1.35),
    ("id3_stream", "adamw", "step", 1.25),
    ("id3_stream", "adamw", "cpu", 1.25),
    ("id3_stream_rows", "lora", "peak", 1.35),
    ("id3_stream_rows", "adamw", "step", 1.25),
    ("id3_stream_rows", "adamw", "cpu", 1.25),
)


def targets(result: dict) -> list[str]:
    """One line per target and size: the measured ratio and whether it is met."""
    out = []
    for size, rows in result["sizes"].items():
        by = {r["case"]: r for r in rows if "error" not in r}
        for case, base, what, limit in TARGETS:
            r = by.get(case, {}).get(f"{what}_over_{base}")
            if r is None:
                continue
            verdict = "met" if r <= limit else f"NOT met (by {r / limit - 1:.0%})"
            name = {"cpu": "step CPU time"}.get(what, what)
            out.append(f"{size}: {LABELS[case]} {name} = {r:.2f}x {LABELS[base]} "
                       f"(target <= {limit}x): {verdict}")
    return out


def _opt(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    lines = [
        "# Memory of a bf16 Llama fine-tuning step (torch)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Date: {result['date']}; commit {result['commit']}  ",
        f"bf16 weights, "
        f"{'gradient checkpointing' if result.get('checkpointing', True) else 'no gradient checkpointing'}"
        f", sequence {result['seq']}, batch {result['batch']}, "
        f"{result['steps']} steps, budget {result['budget_frac']:.1%} of the parameters (ID3: "
        f"max_steps={result['max_steps']}"
        + (f", eps={result['id3_eps']}" if result.get("id3_eps") is not None else "")
        + ", so every measured step selects), each case in its own "
        "process. AdamW ratios are to the best AdamW form measured for each column (for-loop, "
        "fused, foreach). Extra peak: peak resident memory while the optimizer is built and the steps "
        "run, minus resident memory after building the model. Step: median over steps 2..n "
        "of the wall time; step CPU: of the process's CPU time (all threads), which depends "
        "less on what else runs on the machine; load: 1-minute load average at the end of the "
        f"case. Allocator: {result['malloc']}.",
        "",
    ]
    for size, rows in result["sizes"].items():
        n = next((r["params"] for r in rows if "params" in r), 0)
        lines += [f"## {size} ({n / 1e6:,.1f}M parameters)", "",
                  "| case | extra peak | vs AdamW | vs LoRA | step | vs AdamW | step CPU | vs AdamW "
                  "| optimizer state | vs AdamW | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {LABELS.get(r['case'], r['case'])} | error: {r['error'][-120:]!r} | | | | | | | | | |")
                continue

            def x(v):
                return "n/a" if v is None else f"{v:.2f}x"

            lines.append(
                f"| {LABELS.get(r['case'], r['case'])} | {r['extra_peak'] / 2**20:,.0f} MiB | "
                f"{x(r.get('peak_over_adamw'))} | {x(r.get('peak_over_lora'))} | {r['step_s']:.2f} s | "
                f"{x(r.get('step_over_adamw'))} | {_opt(r.get('step_cpu_s'), '{:.2f} s')} | "
                f"{x(r.get('cpu_over_adamw'))} | {r['state_bytes'] / 2**20:,.1f} MiB | "
                f"{x(r.get('state_over_adamw'))} | {_opt(r.get('load'), '{:.1f}')} |")
        lines.append("")
    lines += [f"- {t}" for t in targets(result)] + [""]
    lines += [f"Note: {n}" for n in result.get("notes", [])]
    if "jax" in result:
        lines += ["## JAX", ""]
        if result["jax"]["rows"] is None:
            lines.append(f"Not run: {result['jax']['status']}.")
        else:
            lines.append("```\n" + json.dumps(result["jax"]["rows"], indent=1) + "\n```")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="200m,1b", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(LABELS)}")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS, help="ID3's max_steps")
    ap.add_argument("--id3-eps", type=float, default=None, help="ID3's eps (default: its own)")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="train without gradient checkpointing (every case)")
    ap.add_argument("--out", default=None, help="folder for memory.md / memory.json")
    ap.add_argument("--no-jax", action="store_true", help="skip the JAX rows")
    ap.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                    help="fixed: glibc mmap threshold fixed at 128 KiB in every case (default)")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only rewrite the markdown of a saved memory.json (to --out)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sizes = a.sizes.split(",")
    OPTIONS.update(checkpointing=not a.no_checkpointing, max_steps=a.max_steps, id3_eps=a.id3_eps)
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"--sizes: unknown size {s!r}; choose from {', '.join(SIZES)}.")
    if a.child:
        print(json.dumps(run_case(a.child, sizes[0], a.steps, a.reference)))
        return
    if a.render:
        with open(a.render) as f:
            result = json.load(f)
        md = markdown(result)
        if a.out:
            with open(os.path.join(a.out, "memory.md"), "w") as f:
                f.write(md + "\n")
        print(md)
        return
    cases = a.cases.split(",")
    for c in cases:
        if c not in LABELS:
            raise SystemExit(f"--cases: unknown case {c!r}; choose from {', '.join(LABELS)}.")

    def save(result: dict) -> None:
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "memory.json"), "w") as f:
                json.dump(result, f, indent=1)
            with open(os.path.join(a.out, "memory.md"), "w") as f:
                f.write(markdown(result) + "\n")

    result = run(sizes, cases, a.steps, jax_rows=not a.no_jax, malloc=a.malloc, save=save)
    save(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
