"""Serving several adapters on one base model: each request names a summary, which is
attached for that request and detached after it.

One MiniLM (``BertForSequenceClassification``, 2-way head) stays in memory. Three adapter
folders are made first (``--steps`` quick fine-tuning steps each on Rotten Tomatoes with
ID3, PaFI and BitFit; or pass three folders with ``--adapters``). Then a stream of requests,
each ``(adapter, sentence)``, is served by ``torch_bridge.attach(model, summary)``, a forward
pass and ``handle.detach()``. At the end the model is checked to be bit-for-bit the base, and
the median swap time (attach + detach) is printed next to the median forward time::

    python examples/serve_adapters.py               # about a minute on 2 CPU cores

Only an example; it is not part of the library.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import _common  # noqa: E402

METHODS = ("id3", "pafi", "bitfit")


def make_adapters(base: torch.nn.Module, tok, root: str, steps: int) -> list[str]:
    """Three adapter folders of ``base``, one per method, ``steps`` steps each."""
    import torch_bridge

    train = _common.take(_common.rotten_tomatoes()["train"], 16 * steps)
    enc = tok(train.texts, padding="max_length", truncation=True, max_length=48,
              return_tensors="pt")
    labels = torch.as_tensor(train.labels)
    budget = round(0.005 * sum(p.numel() for p in base.parameters()))
    folders = []
    for method in METHODS:
        model = copy.deepcopy(base).train()
        kw: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.0, "budget": budget}
        if method == "id3":
            kw["max_steps"] = steps
        opt = torch_bridge.get_selective_optimizer(torch.optim.AdamW, method)(
            model.parameters(), **kw)
        for s in range(steps):
            sl = slice(16 * s, 16 * s + 16)
            out = model(input_ids=enc["input_ids"][sl], attention_mask=enc["attention_mask"][sl])
            loss = torch.nn.functional.cross_entropy(out.logits, labels[sl])
            opt.zero_grad()
            loss.backward()
            opt.step()
        folders.append(torch_bridge.save_pretrained(
            opt.get_summary(model), os.path.join(root, method), base=base, overwrite=True,
            base_model="sentence-transformers/all-MiniLM-L6-v2"))
    return folders


def serve(model: torch.nn.Module, tok, adapters: dict[str, Any],
          requests: list[tuple[str, str]]) -> dict[str, Any]:
    """Answers each ``(adapter name, text)`` request with the adapter attached."""
    import torch_bridge

    model.eval()
    swap, forward, answers = [], [], []
    with torch.no_grad():
        for name, text in requests:
            enc = tok([text], truncation=True, max_length=64, return_tensors="pt")
            t0 = time.perf_counter()
            handle = torch_bridge.attach(model, adapters[name], label=name)
            t1 = time.perf_counter()
            logits = model(**enc).logits
            t2 = time.perf_counter()
            handle.detach()
            t3 = time.perf_counter()
            swap.append((t1 - t0) + (t3 - t2))
            forward.append(t2 - t1)
            answers.append((name, int(logits.argmax(-1)), text))
    return {"answers": answers, "swap_s": sorted(swap)[len(swap) // 2],
            "forward_s": sorted(forward)[len(forward) // 2]}


def run(steps: int = 2, n_requests: int = 12, adapters: list[str] | None = None,
        folder: str | None = None) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    import torch_bridge

    logging.set_verbosity_error()
    path = _common.minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tok = AutoTokenizer.from_pretrained(path)
    if adapters is None:
        adapters = make_adapters(model, tok, folder or tempfile.mkdtemp(prefix="serve-"), steps)
    # load (and check against the model) once; the summaries stay in memory, O(budget) each
    loaded = {os.path.basename(os.path.normpath(f)): torch_bridge.load_pretrained(f, model)
              for f in adapters}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = _common.take(_common.rotten_tomatoes()["test"], n_requests).texts
    names = list(loaded)
    requests = [(names[i % len(names)], t) for i, t in enumerate(texts)]
    result = serve(model, tok, loaded, requests)
    result["base_unchanged"] = all(torch.equal(before[k], v)
                                   for k, v in model.state_dict().items())
    result["entries"] = {n: s["budget_used"] for n, s in loaded.items()}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="fine-tuning steps per adapter")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--adapters", nargs=3, default=None, metavar="FOLDER",
                   help="three torch adapter folders of MiniLM (default: make them)")
    p.add_argument("--folder", default=None, help="where to write the three adapters")
    args = p.parse_args(argv)
    r = run(args.steps, args.requests, args.adapters, args.folder)
    for name, label, text in r["answers"]:
        print(f"[{name:>6}] {'fresh ' if label else 'rotten'}  {text[:70]}")
    print(f"adapters {r['entries']}; median swap (attach + detach) {r['swap_s'] * 1e3:.1f} ms, "
          f"median forward {r['forward_s'] * 1e3:.1f} ms; base bit-for-bit unchanged: "
          f"{r['base_unchanged']}")
    if not r["base_unchanged"]:
        raise SystemExit(1)
    return r


if __name__ == "__main__":
    main()
