"""The library's main job in miniature: ``python -m examples.demo`` (or ``make demo``).

1. Pretrain a small Flax NNX MLP on digits 0-4 of ``sklearn.datasets.load_digits``.
2. Fine-tune a copy of it on digits 5-9 with each method (ID3, PaFI, BitFit, FISH mask,
   random mask, full fine-tuning) at the same budget, in the wrapper form around ``optax.adamw`` so that
   unselected entries are guaranteed never to move, and check that with :func:`verify`.
3. Print a table: test accuracy, budget used, optimizer-state bytes, summary bytes on disk
   and milliseconds per training step.
4. Save each method's :class:`SparseSummary`, load it back onto the *pretrained* model and
   show that the accuracy (and every parameter) is reproduced exactly.

Example:
  $ python -m examples.demo --methods id3,pafi --budget 300 --steps 150 --out /tmp/d

Everything runs on CPU in well under a minute on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_selective as osel

METHODS = ("id3", "pafi", "bitfit", "fish", "random", "fft")
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- data and model


@dataclasses.dataclass(frozen=True)
class Split:
    x: jax.Array  # float32 [n, 64], pixel values scaled to [0, 1]
    y: jax.Array  # int32 [n]


def load_tasks(seed: int = 0) -> dict[str, Split]:
    """Digits 0-4 (pretraining task) and 5-9 (fine-tuning task), each with a 25 % test split.

    Returns a dict with keys ``pre_train``, ``pre_test``, ``ft_train``, ``ft_test``.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    out = {}
    for name, classes in (("pre", range(0, 5)), ("ft", range(5, 10))):
        idx = rng.permutation(np.flatnonzero(np.isin(y, list(classes))))
        cut = len(idx) * 3 // 4
        out[f"{name}_train"] = Split(jnp.asarray(x[idx[:cut]]), jnp.asarray(y[idx[:cut]]))
        out[f"{name}_test"] = Split(jnp.asarray(x[idx[cut:]]), jnp.asarray(y[idx[cut:]]))
    return out


class MLP(nnx.Module):
    """64 -> hidden -> hidden -> 10 classifier with ReLU."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def _loss(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: MLP, opt: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One full-batch step; compiled once per optimizer and reused for every later step."""
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    opt.update(model, grads)
    return loss


@nnx.jit
def _predict(model: MLP, x: jax.Array) -> jax.Array:
    return jnp.argmax(model(x), axis=-1)


def accuracy(model: MLP, split: Split) -> float:
    """Fraction of ``split`` classified correctly."""
    return float(np.mean(np.asarray(_predict(model, split.x)) == np.asarray(split.y)))


def train(
    model: MLP,
    tx: optax.GradientTransformation,
    data: Split,
    steps: int,
    desc: str,
    progress: bool = True,
) -> tuple[nnx.Optimizer, float]:
    """Trains ``model`` in place; returns the optimizer and milliseconds per step.

    The first step (which compiles) is left out of the timing.
    """
    from tqdm.auto import tqdm

    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, file=sys.stderr)
    start = None
    for i in bar:
        loss = train_step(model, opt, data.x, data.y)
        if i == 0:
            jax.block_until_ready(loss)
            start = time.perf_counter()
        elif i % 25 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    jax.block_until_ready(nnx.state(model))
    ms = 1e3 * (time.perf_counter() - start) / max(steps - 1, 1) if steps > 1 else float("nan")
    return opt, ms


def pretrain(
    tasks: dict[str, Split], *, hidden: int, steps: int, seed: int, progress: bool = True
) -> MLP:
    """A model trained fully (Adam) on digits 0-4."""
    model = MLP(hidden, rngs=nnx.Rngs(seed))
    train(model, optax.adam(1e-2), tasks["pre_train"], steps, "pretrain 0-4", progress)
    return model


# ----------------------------------------------------------------------------- fine-tuning


def make_tx(
    method: str, budget: int, steps: int, lr: float, weight_decay: float, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    """The selective optimizer for ``method``, wrapping ``optax.adamw``.

    ID3 spends its budget over the first half of the steps (``max_steps = steps // 2``). FISH
    scores a single step (``fish_steps = 1``): the demo trains full-batch with no choose_all
    leaves, so every scoring step would see the same gradient at the same parameters. The
    random mask draws from ``seed``.
    """
    inner = optax.adamw(lr, weight_decay=weight_decay)
    offered = {"budget": budget, "max_steps": max(1, steps // 2), "exp": 1.0, "eps": 1e-3,
               "fish_steps": 1, "seed": seed}
    takes = osel.methods.arguments(method)  # any registered method; raises for unknown names
    return osel.selective(method, inner=inner, **{k: v for k, v in offered.items() if k in takes})


@dataclasses.dataclass
class Result:
    method: str
    accuracy: float  # on the fine-tuning task's test split
    accuracy_old: float  # on the pretraining task's test split (forgetting)
    budget_used: int
    opt_state_bytes: int
    summary_bytes: int  # on disk
    ms_per_step: float
    summary_path: str
    reloaded_accuracy: float = float("nan")
    params_identical: bool = False


def tree_bytes(tree) -> int:
    """Bytes of all arrays in ``tree``."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def dir_bytes(path: str) -> int:
    """Bytes of all files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def finetune(
    method: str,
    pretrained: MLP,
    tasks: dict[str, Split],
    *,
    budget: int,
    steps: int,
    lr: float,
    weight_decay: float,
    out: str,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Result, MLP]:
    """Fine-tunes a copy of ``pretrained`` on digits 5-9, verifies it, saves its summary.

    Returns the result row and the fine-tuned model.
    """
    model = nnx.clone(pretrained)
    tx = make_tx(method, budget, steps, lr, weight_decay, seed)
    opt, ms = train(model, tx, tasks["ft_train"], steps, f"fine-tune {method}", progress)
    before = nnx.state(pretrained, nnx.Param)
    after = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(before))
    osel.verify(before, after, opt.opt_state, budget if method != "fft" else total)
    summary = osel.make_summary(after, opt.opt_state, method=method)
    path = os.path.join(out, f"summary_{method}")
    osel.save_summary(path, summary, overwrite=True)
    return Result(
        method=method,
        accuracy=accuracy(model, tasks["ft_test"]),
        accuracy_old=accuracy(model, tasks["pre_test"]),
        budget_used=osel.budget_used(opt.opt_state),
        opt_state_bytes=tree_bytes(opt.opt_state),
        summary_bytes=dir_bytes(path),
        ms_per_step=ms,
        summary_path=path,
    ), model


def reload(result: Result, pretrained: MLP, finetuned: MLP, tasks: dict[str, Split]) -> None:
    """Loads the saved summary onto a copy of the pretrained model and re-measures."""
    model = nnx.clone(pretrained)
    summary = osel.load_summary(result.summary_path)
    nnx.update(model, osel.apply_summary(nnx.state(model, nnx.Param), summary))
    result.reloaded_accuracy = accuracy(model, tasks["ft_test"])
    a = jax.tree.leaves(nnx.state(model, nnx.Param))
    b = jax.tree.leaves(nnx.state(finetuned, nnx.Param))
    result.params_identical = len(a) == len(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)
    )


# ----------------------------------------------------------------------------- report


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def format_table(results: Sequence[Result], num_params: int) -> str:
    """The results table as aligned plain text."""
    head = (
        "method",
        "acc 5-9",
        "acc 0-4 (old task)",
        "budget used",
        "opt state",
        "summary on disk",
        "ms/step",
    )
    rows = [
        (
            r.method,
            f"{100 * r.accuracy:.1f}%",
            f"{100 * r.accuracy_old:.1f}%",
            f"{r.budget_used} ({100 * r.budget_used / num_params:.1f}%)",
            _kb(r.opt_state_bytes),
            _kb(r.summary_bytes),
            f"{r.ms_per_step:.2f}",
        )
        for r in results
    ]
    return _align(head, rows)


def format_reload_table(results: Sequence[Result]) -> str:
    head = ("method", "acc after fine-tuning", "acc from reloaded summary", "exact")
    rows = [
        (
            r.method,
            f"{100 * r.accuracy:.2f}%",
            f"{100 * r.reloaded_accuracy:.2f}%",
            "yes" if r.params_identical and r.reloaded_accuracy == r.accuracy else "NO",
        )
        for r in results
    ]
    return _align(head, rows)


def _align(head, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


# ----------------------------------------------------------------------------- command line


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--methods got {text!r}; give a comma-separated list of {', '.join(METHODS)}."
        )
    return tuple(dict.fromkeys(names))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}.")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description="Pretrain a small MLP on digits 0-4, fine-tune it on digits 5-9 with ID3, "
        "PaFI, BitFit, FISH, a random mask and full fine-tuning at the same budget, save each sparse summary and "
        "reload it onto the pretrained model.",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=METHODS,
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    p.add_argument(
        "--budget",
        type=_positive,
        default=300,
        help="entries that may change, for every selective method (default: 300)",
    )
    p.add_argument(
        "--steps", type=_positive, default=200, help="fine-tuning steps per method (default: 200)"
    )
    p.add_argument(
        "--pretrain-steps", type=_positive, default=300, help="pretraining steps (default: 300)"
    )
    p.add_argument("--hidden", type=_positive, default=64, help="hidden width (default: 64)")
    p.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate (default: 3e-2)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.01,
        help="AdamW weight decay; unselected entries never move (default: 0.01)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--out", default="demo_out", help="output folder for the summaries (default: ./demo_out)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    """Runs the demo; returns one :class:`Result` per method. Exits 1 if a reload differs."""
    args = parse_args(argv)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    tasks = load_tasks(args.seed)
    pretrained = pretrain(
        tasks, hidden=args.hidden, steps=args.pretrain_steps, seed=args.seed, progress=progress
    )
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(pretrained, nnx.Param)))
    if args.budget >= num_params:
        raise SystemExit(
            f"--budget {args.budget} is not below the model's {num_params} parameters; "
            "that is full fine-tuning (method fft)."
        )
    print(
        f"Pretrained MLP 64-{args.hidden}-{args.hidden}-10 ({num_params} parameters) on digits "
        f"0-4: test accuracy {100 * accuracy(pretrained, tasks['pre_test']):.1f}% "
        f"(digits 5-9: {100 * accuracy(pretrained, tasks['ft_test']):.1f}%)."
    )
    print(
        f"Fine-tuning on digits 5-9 for {args.steps} steps, budget {args.budget} entries "
        f"({100 * args.budget / num_params:.1f}%), AdamW wrapped by each method.\n"
    )
    results = []
    for method in args.methods:
        result, model = finetune(
            method,
            pretrained,
            tasks,
            budget=args.budget,
            steps=args.steps,
            lr=args.lr,
            weight_decay=args.weight_decay,
            out=args.out,
            progress=progress,
            seed=args.seed,
        )
        reload(result, pretrained, model, tasks)
        results.append(result)
    print(format_table(results, num_params))
    print(
        f"\nSummaries saved under {os.path.abspath(args.out)}; reloading each onto the "
        "pretrained model:\n"
    )
    print(format_reload_table(results))
    print(f"\nDone in {time.perf_counter() - t0:.1f} s.")
    if not all(r.params_identical and r.reloaded_accuracy == r.accuracy for r in results):
        raise SystemExit("a reloaded summary did not reproduce its fine-tuned model exactly.")
    return results


if __name__ == "__main__":
    main()
