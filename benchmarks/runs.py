"""What every benchmark run shares: the commit it ran on, writing results, the 0.4 reference.

Kept free of jax and torch imports, so that any worker process (and the tests) can use it.
Run the benchmarks as modules from the repository root (``python -m benchmarks.suite``).

>>> info = run_info()
>>> sorted(info) == ["commit", "date", "dirty", "python"]
True
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "selective-optimizers==0.4"


def run_info(root: str | os.PathLike = ROOT) -> dict[str, Any]:
    """Where a result comes from: ``commit`` (``git rev-parse HEAD``), ``dirty`` (uncommitted
    changes to tracked files), UTC ``date`` and ``python``. Outside a git checkout (an unpacked
    archive) ``commit`` and ``dirty`` are None."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def run_line(info: dict[str, Any]) -> str:
    """The run as one Markdown line: ``- commit: <sha> (uncommitted changes), date: ...``."""
    commit = info.get("commit") or "unknown (not a git checkout)"
    dirty = " (with uncommitted changes)" if info.get("dirty") else ""
    return f"- commit: `{commit}`{dirty}, date: {info.get('date')}"


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> dict[str, Any]:
    """Writes ``payload`` as indented JSON with a ``run`` entry (:func:`run_info`) added, unless
    it already has one; returns what was written."""
    payload = {**payload, "run": payload.get("run") or run_info()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


class ReferenceUnavailable(RuntimeError):
    """``pip`` could not install the reference (offline machine, no index, timeout)."""


def install_reference(target: str | os.PathLike | None = None, timeout: float = 300) -> Path:
    """Installs ``selective-optimizers==0.4`` (without dependencies) into ``target`` (a new
    temporary folder by default) and returns that folder.

    The reference's top-level package is ``selective_optimizers``, as is this project's
    compatibility package: import it only in a process set up with :func:`reference_process`
    (or with ours set aside). Raises :class:`ReferenceUnavailable` if pip fails.
    """
    target = Path(target) if target is not None else Path(tempfile.mkdtemp(prefix="selective_optimizers_0.4_"))
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), REFERENCE]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ReferenceUnavailable(f"pip could not install {REFERENCE}: {e}") from e
    if done.returncode != 0:
        raise ReferenceUnavailable(f"pip could not install {REFERENCE}: {done.stderr.strip()[-400:]}")
    return target


def reference_process(target: str | os.PathLike) -> dict[str, Any]:
    """``cwd`` and ``env`` for :func:`subprocess.run` so that ``python -c``/``python -m`` there
    imports the reference as ``selective_optimizers`` (the working directory comes first on
    ``sys.path``) and this checkout's ``benchmarks``, ``optax_selective`` and ``torch_bridge``
    (from ``PYTHONPATH``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {"cwd": str(target), "env": env}
