"""Quality benchmark: test accuracy of each method at equal budget, MiniLM on Rotten Tomatoes.

Protocol (written here so the numbers can be reproduced):

* data: the fixed split of ``examples._common.rotten_tomatoes`` (by movie, SHA-256 buckets:
  20% test, 10% dev, 70% train); the first ``n_train`` train rows, all dev rows for the
  learning-rate pick, the first ``n_test`` test rows for the reported accuracy;
* model: all-MiniLM-L6-v2 (offline wheel) with a fresh 2-way head that is ``choose_all`` and
  counts toward the budget; budget = fraction of the encoder's parameters + the head;
* methods: ID3 (exp 1, T = steps / 2, eps picked on dev from {1e-3, 0.1}), PaFI, BitFit,
  FISH and random through the torch bridge with
  AdamW (no weight decay); full fine-tuning (FFT) with AdamW; LoRA (peft, query/value, rank
  chosen so its entries come closest to the budget) with AdamW;
* learning rate: per method, the best dev accuracy over a small grid at the middle budget,
  seed 0 (for ID3 the grid is lr x eps); then every budget with every seed uses it;
* JAX: the same comparison at one budget through the Flax port (``examples/minilm_flax.py``),
  ``optax.chain(selective_<method>(...), optax.adam(lr))``, same learning rates, seed 0.

Cost cuts (none changes what a run trains or how it is scored, beyond float rounding):

* dynamic padding: every training batch is cut to its longest row (rows are tokenized to
  ``max_length`` once; the mean row has 27 tokens of 64), and evaluation scores the rows
  sorted by length, 128 a batch, each batch cut to its longest row, logits put back in order;
* one process tokenizes each split once and loads the pretrained weights once per seed
  (later runs deep-copy them; the new head is initialised exactly as by ``from_pretrained``
  under that seed); the dropout RNG is re-seeded with the run's seed before training, so a
  run does not depend on what ran before it in the process;
* grid runs score dev *and* test; the run with the chosen lr (middle budget, seed 0) is the
  same training as that test run, so its test accuracy is used instead of training it again
  (marked ``from_grid`` in the JSON; the lr was picked on dev only);
* BitFit selects bias/LayerNorm entries in leaf order until the budget less the head is met,
  so all budgets at or above the 31,104 bias entries train the same entries: such runs are
  made once and reported under each budget (marked ``same_run_as_budget``);
* every run records its wall and process-CPU seconds.

Trim to fit 2 h on 2 cores: the JAX-vs-PyTorch comparison runs seed 0 only (``jax_seeds``;
``--jax-seeds 0,1,2`` for three). Measured on 2 idle cores (AMD EPYC, 2026-11-28): 22 grid
+ 47 torch test runs at 57-117 s and 4 JAX runs at 125-139 s, 97 min in all
(``benchmarks/results/quality.md``).

``--quick`` (one budget, one seed, no grid, a few dozen steps) is a smoke run of the whole
pipeline for a 2-core CPU in minutes; its numbers are not a result. Run::

    python -m benchmarks.quality.run --quick
    python -m benchmarks.quality.run            # the full protocol

``--resume-from FILE`` continues an earlier run of the same configuration (an interrupted one,
or one made for some methods only): its runs, dev grid and picked learning rates are kept and
only what is missing is trained. The JSON lists every command that contributed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.runs import ROOT, run_info, run_line

SELECTIVE = ("id3", "pafi", "bitfit", "fish", "random")
TORCH_METHODS = (*SELECTIVE, "lora", "fft")
JAX_METHODS = ("id3", "pafi", "bitfit", "fft")

FULL = {
    "budgets": [0.0005, 0.002, 0.01],
    "jax_budget": 0.002,
    "seeds": [0, 1, 2],
    "jax_seeds": [0],  # the JAX-vs-PyTorch check at one seed keeps the run within 2 h on 2 cores
    "steps": 150,
    "batch_size": 16,
    "max_length": 64,
    "n_train": 2400,
    "n_dev": None,
    "n_test": None,
    # ID3's score eps is picked on dev with the lr: 0.1 (the ID3 paper's choice) is ~3x MiniLM's
    # median |θ|, which makes the score nearly |g| (benchmarks/results/quality_id3_ablation.md)
    "id3_eps_grid": [1e-3, 0.1],
    "lr_grid": {
        "id3": [1e-3, 3e-3],
        "pafi": [3e-4, 1e-3, 3e-3],
        "bitfit": [1e-3, 3e-3, 1e-2],
        "fish": [3e-4, 1e-3, 3e-3],
        "random": [3e-4, 1e-3, 3e-3],
        "lora": [3e-4, 1e-3, 3e-3],
        "fft": [2e-5, 5e-5, 1e-4],
    },
}
QUICK = {
    "budgets": [0.002],
    "jax_budget": 0.002,
    "seeds": [0],
    "steps": 30,
    "batch_size": 16,
    "max_length": 48,
    "n_train": 480,
    "n_dev": None,
    "n_test": 400,
    "id3_eps_grid": [1e-3],
    # no grid in quick mode: the middle of each full grid
    "lr_grid": {"id3": [1e-3], "pafi": [1e-3], "bitfit": [3e-3], "fish": [1e-3], "random": [1e-3],
                "lora": [1e-3], "fft": [5e-5]},
}


def machine() -> dict[str, Any]:
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def torch_bridge_available() -> bool:
    try:
        import selective_optimizers.wrap  # noqa: F401
    except ImportError:
        return False
    return True


def run_one(framework: str, method: str, frac: float, lr: float, seed: int, split: str,
            n_eval: int | None, cfg: dict, also_eval: dict | None = None,
            eps: float = 1e-3) -> dict[str, Any]:
    common = dict(method=method, budget_frac=frac, lr=lr, seed=seed, steps=cfg["steps"],
                  batch_size=cfg["batch_size"], max_length=cfg["max_length"],
                  n_train=cfg["n_train"], eval_split=split, n_eval=n_eval, eps=eps,
                  check_summary=False)
    w0, c0 = time.time(), time.process_time()
    if framework == "torch":
        import torch

        from examples.minilm_trainer import finetune

        r = finetune(trainer=False, device="cuda" if torch.cuda.is_available() else "cpu",
                     also_eval=also_eval, **common)
    else:
        from examples.minilm_flax import finetune

        r = finetune(**common)
    r["wall_seconds"], r["cpu_seconds"] = time.time() - w0, time.process_time() - c0
    r["eval_split"] = split
    r["loss_first"] = float(np.mean(r["losses"][:5]))
    r["loss_last"] = float(np.mean(r["losses"][-5:]))
    del r["losses"]
    r["eps"] = eps if method == "id3" else None
    print(f"  {framework:5s} {method:6s} budget={frac:.4%} lr={lr:g}"
          f"{f' eps={eps:g}' if method == 'id3' else ''} seed={seed} "
          f"{split}_acc={r['accuracy']:.4f} used={r['budget_used']} "
          f"loss {r['loss_first']:.3f}->{r['loss_last']:.3f} ({r['wall_seconds']:.0f}s)",
          flush=True)
    return r


def encoder_entries() -> tuple[int, int]:
    """MiniLM encoder entries: all of them, and those BitFit can select (1-D leaves: biases
    and LayerNorm parameters)."""
    from examples.minilm_trainer import pretrained

    body = list(pretrained(0).bert.parameters())
    return sum(p.numel() for p in body), sum(p.numel() for p in body if p.dim() <= 1)


def selection_key(method: str, frac: float, n_body: int, n_bias: int) -> float | int:
    """Runs of ``method`` whose keys are equal train the same entries the same way.

    BitFit takes bias entries in leaf order until the budget less the head is met
    (``optax_selective/methods/bitfit.py``), so every budget at or above the bias count
    selects the same entries; other methods' selections depend on the budget."""
    if method != "bitfit":
        return frac
    from examples import _common

    return min(_common.budget_from_fraction(frac, n_body, 0), n_bias)


def aggregate(runs: list[dict], framework: str, method: str, frac: float | None) -> dict:
    accs = [r["accuracy"] for r in runs if r["framework"] == framework and r["method"] == method
            and r["eval_split"] == "test" and (frac is None or r["budget_frac"] == frac)]
    if not accs:
        return {}
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1
            else 0.0, "n": len(accs)}


def fmt(a: dict) -> str:
    if not a:
        return "not run"
    return f"{a['mean']:.4f} ± {a['std']:.4f} (n={a['n']})"


def write_outputs(out: Path, tag: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "run": payload.get("run") or run_info()}  # the commit it ran on
    (out / f"{tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
    cfg, runs = payload["config"], payload["runs"]
    title = "# Quality benchmark" + (" (QUICK smoke run, not a result)" if payload["quick"] else "")
    if not payload["complete"]:
        title += f" (INCOMPLETE: {len(runs)} runs so far)"
    lines = [title,
             "", f"MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes, test accuracy, "
             f"{len(cfg['seeds'])} seed(s) (JAX: seeds {cfg.get('jax_seeds', cfg['seeds'])}; "
             "n per cell); mean ± sample std over seeds.", "",
             *[f"- command: `{c}`" for c in payload.get("commands", [payload.get("command")])],
             f"- machine: {payload['machine']['cpu']}, {payload['machine']['cores_visible']} "
             f"cores visible, torch {payload['machine']['torch']}, jax {payload['machine']['jax']}"
             f" ({payload['machine']['jax_backend']}); GPU: {payload['machine']['gpu']}",
             f"- date: {payload['date']}, wall time {payload['wall_seconds'] / 60:.1f} min"
             + (f" over {len(payload['commands'])} commands" if len(payload.get("commands", []))
                > 1 else ""),
             run_line(payload["run"]),
             f"- steps {cfg['steps']}, batch {cfg['batch_size']}, max length {cfg['max_length']},"
             f" train rows {cfg['n_train']}, test rows {payload['n_test_rows']}",
             f"- encoder parameters {payload.get('encoder_params')}, head (choose_all) "
             f"{payload.get('head_params')}", ""]
    if payload.get("notes"):
        lines += [f"- note: {n}" for n in payload["notes"]] + [""]
    budgets = cfg["budgets"]
    lines += ["## PyTorch", "",
              "| method | lr | " + " | ".join(f"{b:.2%} of encoder" for b in budgets) + " |",
              "|---|---|" + "---|" * len(budgets)]
    for m in TORCH_METHODS:
        lr = payload["chosen_lr"].get(f"torch/{m}")
        eps = payload.get("chosen_eps", {}).get(f"torch/{m}")
        if lr is not None and eps is not None:
            lr = f"{lr:g} (eps {eps:g})"
        if m == "fft":
            cells = [fmt(aggregate(runs, "torch", m, None)) + " (all entries)"] + [""] * (
                len(budgets) - 1)
        else:
            cells = [fmt(aggregate(runs, "torch", m, b)) for b in budgets]
        lines.append(f"| {m} | {lr if lr is not None else '-'} | " + " | ".join(cells) + " |")
    jb = cfg["jax_budget"]
    lines += ["", f"## JAX (Flax port) vs PyTorch at {jb:.2%} of encoder", "",
              "| method | JAX | PyTorch |", "|---|---|---|"]
    for m in JAX_METHODS:
        frac = None if m == "fft" else jb
        lines.append(f"| {m} | {fmt(aggregate(runs, 'jax', m, frac))} | "
                     f"{fmt(aggregate(runs, 'torch', m, frac))} |")
    if payload.get("grid"):
        lines += ["", "## Learning-rate pick (dev accuracy, seed 0, middle budget)", "",
                  "| framework/method | lr (eps for ID3): dev acc |", "|---|---|"]
        for key, vals in payload["grid"].items():
            cells = [f"{v[0]:g}{f' ({v[1]:g})' if len(v) == 3 else ''}: {v[-1]:.4f}" for v in vals]
            lines.append(f"| {key} | " + ", ".join(cells) + " |")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    plot(out / f"{tag}.png", payload)


def plot(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, budgets = payload["runs"], payload["config"]["budgets"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for fw, marker in (("torch", "o"), ("jax", "s")):
        for m in (*SELECTIVE, "lora"):
            pts = [(b * 100, aggregate(runs, fw, m, b)) for b in budgets]
            pts = [(x, a) for x, a in pts if a]
            if pts:
                ax.errorbar([x for x, _ in pts], [a["mean"] for _, a in pts],
                            yerr=[a["std"] for _, a in pts], marker=marker, capsize=3,
                            linestyle="-" if fw == "torch" else ":", label=f"{m} ({fw})")
        a = aggregate(runs, fw, "fft", None)
        if a:
            ax.axhline(a["mean"], linestyle="--" if fw == "torch" else ":", color="gray",
                       label=f"fft ({fw})")
    ax.set_xscale("log")
    ax.set_xlabel("budget (% of encoder parameters, + head)")
    ax.set_ylabel("test accuracy")
    title = "MiniLM on Rotten Tomatoes"
    ax.set_title(title + (" (QUICK smoke run)" if payload["quick"] else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resume(path: Path, cfg: dict, quick: bool) -> dict:
    """An earlier output to continue from; refused unless it measured the same protocol."""
    earlier = json.loads(path.read_text())
    # more JAX seeds only add runs: every other setting must match
    diff = sorted(k for k in {*cfg, *earlier["config"]}
                  if k != "jax_seeds" and cfg.get(k) != earlier["config"].get(k))
    if diff or earlier["quick"] != quick:
        raise SystemExit(f"--resume-from {path}: its configuration differs from this run's in "
                         f"{diff or ['quick']}; resume with the same options")
    mine = machine()
    if earlier["machine"]["cpu"] != mine["cpu"] or earlier["machine"]["gpu"] != mine["gpu"]:
        raise SystemExit(f"--resume-from {path}: made on {earlier['machine']['cpu']} / GPU "
                         f"{earlier['machine']['gpu']}, this is {mine['cpu']} / GPU {mine['gpu']};"
                         " one table must come from one machine")
    return earlier


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one budget, one seed, no grid")
    p.add_argument("--frameworks", default="torch,jax", help="comma list of torch, jax")
    p.add_argument("--methods", default=",".join(TORCH_METHODS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="output file stem (quality_quick / quality)")
    p.add_argument("--steps", type=int, default=None, help="override the steps per run")
    p.add_argument("--jax-seeds", default=None,
                   help="comma list of seeds for the JAX runs (full protocol default: 0)")
    p.add_argument("--fixed-lr", action="store_true",
                   help="skip the dev grid; use the --quick learning rates (middle of each grid)")
    p.add_argument("--resume-from", default=None, metavar="JSON",
                   help="keep the runs, dev grid and picked lrs of this earlier output (same "
                        "configuration) and train only what is missing")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    notes: list[str] = []
    if args.steps:
        cfg["steps"] = args.steps
    if args.jax_seeds:
        cfg["jax_seeds"] = [int(x) for x in args.jax_seeds.split(",")]
    if args.fixed_lr:
        cfg["lr_grid"] = QUICK["lr_grid"]
        notes.append("learning rates fixed to the middle of each grid (--fixed-lr): no dev pick")
    frameworks = [f for f in args.frameworks.split(",") if f]
    methods = [m for m in args.methods.split(",") if m]
    if "torch" in frameworks and not torch_bridge_available():
        notes.append("torch ID3/PaFI/BitFit not run: the torch bridge (selective_optimizers) "
                     "is not installed in this checkout")
    import torch

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, torch.get_num_threads())))
    t0 = time.time()
    runs: list[dict] = []
    grid: dict[str, list] = {}
    chosen: dict[str, float] = {}
    chosen_eps: dict[str, float] = {}  # ID3's score eps, picked with its lr
    picked: dict[tuple, dict] = {}  # grid runs that double as test runs
    earlier = resume(Path(args.resume_from), cfg, args.quick) if args.resume_from else None
    if earlier:
        runs, grid, notes = earlier["runs"], earlier["grid"], earlier["notes"] + notes
        chosen, chosen_eps = earlier["chosen_lr"], earlier["chosen_eps"]
    mid = cfg["budgets"][len(cfg["budgets"]) // 2]

    def todo(fw):
        ms = [m for m in methods if m in (TORCH_METHODS if fw == "torch" else JAX_METHODS)]
        if fw == "torch" and not torch_bridge_available():
            ms = [m for m in ms if m not in SELECTIVE]
        return ms

    for fw in frameworks:
        for m in todo(fw):
            key = f"{fw}/{m}"
            if key in chosen:  # picked by the run resumed from
                continue
            if fw == "jax" and f"torch/{m}" in chosen:
                chosen[key] = chosen[f"torch/{m}"]
                if f"torch/{m}" in chosen_eps:
                    chosen_eps[key] = chosen_eps[f"torch/{m}"]
                continue
            eps_grid = cfg["id3_eps_grid"] if m == "id3" else [None]
            settings = [(lr, e) for lr in cfg["lr_grid"][m] for e in eps_grid]
            if len(settings) == 1:
                chosen[key], eps = settings[0]
                if eps is not None:
                    chosen_eps[key] = eps
                continue
            print(f"[grid] {key}", flush=True)
            also = {"test": cfg["n_test"]} if fw == "torch" else None
            done = {(lr, e): run_one(fw, m, mid, lr, 0, "dev", cfg["n_dev"], cfg, also,
                                     **({} if e is None else {"eps": e}))
                    for lr, e in settings}
            # ties: the smaller lr, then the smaller eps
            best = max(done, key=lambda s: (done[s]["accuracy"], -s[0], -(s[1] or 0)))
            grid[key] = [[lr, *([] if e is None else [e]), r["accuracy"]]
                         for (lr, e), r in done.items()]
            chosen[key] = best[0]
            if best[1] is not None:
                chosen_eps[key] = best[1]
            if also:  # the chosen setting's grid run is the test run at (mid budget, seed 0)
                picked[(fw, m, mid if m != "fft" else None, 0)] = done[best]
    tag = args.tag or ("quality_quick" if args.quick else "quality")
    from examples import _common

    n_test = len(_common.take(_common.rotten_tomatoes()["test"], cfg["n_test"]).texts)
    command = " ".join(["python -m benchmarks.quality.run"] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    commands = [*earlier.get("commands", [earlier.get("command")]), command] if earlier else [
        command]
    wall_before = earlier["wall_seconds"] if earlier else 0.0

    def save(complete: bool) -> dict:
        payload = {
            "quick": args.quick,
            "complete": complete,
            "command": command,
            "commands": commands,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "wall_seconds": wall_before + time.time() - t0,
            "config": cfg,
            "encoder_params": next((r["encoder_params"] for r in runs), None),
            "head_params": next((r["head_params"] for r in runs), None),
            "n_test_rows": n_test,
            "chosen_lr": chosen,
            "chosen_eps": chosen_eps,
            "grid": grid,
            "notes": notes,
            "runs": runs,
        }
        write_outputs(Path(args.out), tag, payload)
        return payload

    n_body = n_bias = None
    if "torch" in frameworks and "bitfit" in todo("torch"):
        n_body, n_bias = encoder_entries()
    for fw in frameworks:
        for m in todo(fw):
            fracs = [None] if m == "fft" else (
                cfg["budgets"] if fw == "torch" else [cfg["jax_budget"]])
            for frac in fracs:
                seeds = cfg["seeds"] if fw == "torch" else cfg.get("jax_seeds", cfg["seeds"])
                for seed in seeds:
                    if any(r["framework"] == fw and r["method"] == m and r["seed"] == seed
                           and r["eval_split"] == "test" and r["budget_frac"] == frac
                           for r in runs):
                        continue  # made by the run resumed from
                    same = None
                    if fw == "torch" and m == "bitfit" and frac is not None:
                        key = selection_key(m, frac, n_body, n_bias)
                        same = next((r for r in runs if r["framework"] == fw
                                     and r["method"] == m and r["seed"] == seed
                                     and selection_key(m, r["budget_frac"], n_body, n_bias)
                                     == key), None)
                    if same is not None:  # identical configuration: reuse, do not re-train
                        r = {**same, "budget_frac": frac, "same_run_as_budget":
                             same["budget_frac"]}
                    elif (fw, m, frac, seed) in picked:
                        r = {**picked[(fw, m, frac, seed)], "from_grid": True}
                        r["eval_split"], r["accuracy"] = "test", r["also_accuracy"]["test"]
                        r["dev_accuracy"] = picked[(fw, m, frac, seed)]["accuracy"]
                    else:
                        try:
                            eps = chosen_eps.get(f"{fw}/{m}")
                            r = run_one(fw, m, frac or mid, chosen[f"{fw}/{m}"], seed, "test",
                                        cfg["n_test"], cfg,
                                        **({} if eps is None else {"eps": eps}))
                        except Exception as e:  # record and go on: a broken method is a result
                            notes.append(f"{fw}/{m} budget {frac} seed {seed} failed: "
                                         f"{type(e).__name__}: {str(e)[:200]}")
                            print("  FAILED", notes[-1], flush=True)
                            continue
                    if frac is None:
                        r["budget_frac"] = None
                    runs.append(r)
                    save(complete=False)  # partial results survive an interrupted run
    payload = save(complete=True)
    print(f"wrote {args.out}/{tag}.{{md,json,png}} in {payload['wall_seconds'] / 60:.1f} min")
    return payload


if __name__ == "__main__":
    main()
