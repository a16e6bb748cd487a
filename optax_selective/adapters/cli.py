"""The command line, ``python -m optax_selective``: ``inspect`` and ``merge``.

``inspect FOLDER_OR_FILE`` reads an adapter folder (either framework), a JAX summary folder
or a torch summary file, verifies its digests (by reading it with the library's checked
readers) and prints the method, budget, entries per parameter and per layer type (the name
without its layer numbers), dtypes and the base model. ``merge OUT IN1 IN2 ...`` merges
adapter folders saved with their base values.

Example:
  >>> from optax_selective.adapters import cli
  >>> cli.layer_type("encoder.layer.3.attention.self.query.weight")
  'encoder.layer.*.attention.self.query.weight'
  >>> cli.layer_type("['bert']['layers'][3]['query']['kernel']")
  "['bert']['layers'][*]['query']['kernel']"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from optax_selective.adapters import core

_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|(?<=\[)\d+(?=\])")


def layer_type(name: str) -> str:
    """``name`` with its layer numbers replaced by ``*``.

    Example:
      >>> from optax_selective.adapters.cli import layer_type
      >>> layer_type("model.layers.3.mlp.up_proj.weight")
      'model.layers.*.mlp.up_proj.weight'
    """
    return _LAYER_NUMBER.sub("*", name)


def _framework_module(framework: str):
    if framework == "torch":
        try:
            from torch_bridge import adapters as torch_adapters
        except ImportError as e:  # pragma: no cover - torch is installed in the test env
            raise SystemExit(f"error: this is a torch adapter; install torch to read it ({e}).") from e
        return torch_adapters
    from optax_selective.adapters import pretrained

    return pretrained


def describe(path: str) -> dict[str, Any]:
    """What ``inspect`` prints, as a dict (reads and verifies the summary at ``path``)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"nothing at {path}")
    cfg: dict[str, Any] | None = None
    if os.path.isdir(path) and os.path.exists(os.path.join(path, core.CONFIG_NAME)):
        cfg = core.read_config(path)
        read = _framework_module(cfg["framework"]).read_pretrained(path)
        summary, framework, kind = read.summary, cfg["framework"], "adapter folder"
    elif os.path.isdir(path):
        from optax_selective.summary.io import load_summary

        summary, framework, kind = load_summary(path), "jax", "JAX summary folder"
    else:
        from torch_bridge.summary import load_summary_from_disk

        summary, framework, kind = load_summary_from_disk(path), "torch", "torch summary file"
    entries = _framework_module(framework).to_entries(summary)
    method = summary["method"] if framework == "torch" else summary.method
    used = summary["budget_used"] if framework == "torch" else summary.budget_used
    per_type: dict[str, int] = {}
    for e in entries:
        per_type[layer_type(e.name)] = per_type.get(layer_type(e.name), 0) + e.count
    return {
        "path": path, "kind": kind, "framework": framework, "method": method,
        "budget_used": used, "budget": (cfg or {}).get("budget"),
        "hyperparameters": (cfg or {}).get("hyperparameters"),
        "base_model": (cfg or {}).get("base_model"),
        "base_fingerprint": (cfg or {}).get("base_fingerprint"),
        "base_values": bool(cfg and cfg.get("base_file")),
        "naming": (cfg or {}).get("naming"),
        "digest": (cfg or {}).get("digest") or core.entries_digest(entries),
        "digest_verified": True,
        "dtypes": sorted({e.dtype for e in entries}),
        "parameters": [{"name": e.name, "shape": list(e.shape), "dtype": e.dtype,
                        "entries": e.count} for e in entries],
        "layer_types": per_type,
    }


def _print_description(d: dict[str, Any], out) -> None:
    base = d["base_model"]
    base_text = "not recorded" if base is None else (
        base["id"] + (f"@{base['revision']}" if base.get("revision") else ""))
    lines = [
        f"{d['kind']}: {d['path']}",
        f"framework: {d['framework']}   method: {d['method']}   entries: {d['budget_used']}"
        + (f" of budget {d['budget']}" if d["budget"] is not None else ""),
        f"base model: {base_text}   base values stored: {'yes' if d['base_values'] else 'no'}",
        f"dtypes: {', '.join(d['dtypes']) or '-'}   digest: {d['digest'][:16]}... (verified)",
    ]
    if d["hyperparameters"]:
        lines.append(f"hyperparameters: {json.dumps(d['hyperparameters'], sort_keys=True)}")
    if d["base_fingerprint"] is not None:
        lines.append(f"base fingerprint: {json.dumps(d['base_fingerprint'])[:100]}")
    lines.append("entries per layer type:")
    width = max([len(k) for k in d["layer_types"]] + [10])
    lines += [f"  {k:<{width}}  {v:>10}" for k, v in d["layer_types"].items()]
    lines.append("entries per parameter:")
    width = max([len(p["name"]) for p in d["parameters"]] + [10])
    lines += [f"  {p['name']:<{width}}  {p['entries']:>10}  {p['dtype']:<9} {p['shape']}"
              for p in d["parameters"]]
    print("\n".join(lines), file=out)


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--weights must be comma-separated numbers, e.g. 1,0.5; got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m optax_selective``."""
    p = argparse.ArgumentParser(
        prog="python -m optax_selective",
        description="Inspect and merge sparse summaries (adapter folders) of optax-selective.")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="print what a summary holds and verify its digests",
                         description="Print method, budget, entries per parameter and per layer "
                         "type, dtypes and base model of an adapter folder, a JAX summary folder "
                         "or a torch summary file, after verifying its digests.")
    ins.add_argument("path", metavar="FOLDER_OR_FILE")
    ins.add_argument("--json", action="store_true", help="print a JSON object instead")
    mer = sub.add_parser("merge", help="merge adapter folders of one base model",
                         description="Merge adapter folders saved with their base values "
                         "(save_pretrained(..., base=...)) into the adapter folder OUT.")
    mer.add_argument("out", metavar="OUT")
    mer.add_argument("inputs", metavar="IN", nargs="+", help="two or more adapter folders")
    mer.add_argument("--weights", type=_weights, default=None,
                     help="comma-separated weight per input (default 1 each)")
    mer.add_argument("--rule", choices=core.RULES, default="sum",
                     help="sum (task arithmetic), mean, or ties (sign consensus)")
    mer.add_argument("--budget", type=int, default=None,
                     help="keep at most this many entries (largest merged deltas)")
    mer.add_argument("--overwrite", action="store_true", help="replace OUT if it is an adapter")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 bad input).

    Example:
      >>> from optax_selective.adapters import cli
      >>> cli.main(["inspect", "/no/such/adapter"])
      2
    """
    args = parser().parse_args(argv)
    try:
        if args.command == "inspect":
            d = describe(args.path)
            if args.json:
                print(json.dumps(d, indent=1))
            else:
                _print_description(d, sys.stdout)
            return 0
        if len(args.inputs) < 2:
            raise core.AdapterError("merge needs at least two input folders.")
        if args.weights is not None and len(args.weights) != len(args.inputs):
            raise core.AdapterError(f"--weights has {len(args.weights)} numbers for "
                                    f"{len(args.inputs)} inputs.")
        if args.budget is not None and args.budget < 0:
            raise core.AdapterError(f"--budget must be >= 0, got {args.budget}.")
        frameworks = []
        for p in args.inputs:
            frameworks.append(core.read_config(p)["framework"])
        if len(set(frameworks)) > 1:
            raise core.AdapterError(f"the inputs mix frameworks ({frameworks}); convert them to "
                                    "one first (torch_bridge.adapters.to_jax / from_jax).")
        out = _framework_module(frameworks[0]).merge_folders(
            args.out, args.inputs, args.weights, rule=args.rule, budget=args.budget,
            overwrite=args.overwrite)
        d = describe(out)
        print(f"wrote {out}: {d['budget_used']} entries over {len(d['parameters'])} parameters "
              f"(rule {args.rule})")
        return 0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
