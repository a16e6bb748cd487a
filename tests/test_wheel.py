"""The wheel built from the checkout: what it contains, and that it installs and runs alone.

The clean environment is a virtual environment of the base interpreter (which lacks the
project). Its dependencies are not downloaded again: a ``.pth`` line points it at a folder
of links to this environment's installed packages, minus the project itself (its editable
install would otherwise shadow the wheel). pip then installs the wheel with ``--no-index``,
so it must find every declared dependency, within its declared range, among the packages
the suite runs on; the README's quick starts then run from a folder outside the checkout.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests._readme import quick_starts

pytestmark = pytest.mark.side  # builds and installs the wheel with pip (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optax_selective", "torch_bridge", "selective_optimizers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info into the source folder, and a
    # stale build/ there would leak removed modules into the wheel.
    # The copy keeps examples/, benchmarks/ and tests/, so the test sees them left out.
    src, out = tmp_path_factory.mktemp("src") / "checkout", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "site", "*.egg-info", "__pycache__", ".*_cache",
        "bench_out", "demo_out"))
    assert (src / "examples").is_dir() and (src / "tests").is_dir()
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("optax_selective-*.whl")
    return whl


def test_wheel_holds_the_three_packages_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    (info,) = {t for t in tops if t.endswith(".dist-info")}
    assert tops - {info} == set(PACKAGES)
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names and f"{pkg}/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Requires-Dist: jax<0.11,>=0.10.2" in meta  # the tested range, not an open one


def _deps_folder(tmp: Path) -> Path:
    """Links to this environment's installed packages, without the project's own."""
    site = Path(sysconfig.get_paths()["purelib"])
    deps = tmp / "deps"
    deps.mkdir()
    for entry in site.iterdir():
        name = entry.name
        if (name.startswith(("optax_selective", "__editable__", "_virtualenv"))
                or name in (*PACKAGES, "__pycache__") or name.endswith(".pth")):
            continue
        (deps / name).symlink_to(entry)
    return deps


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv_and_runs_the_readme_quick_starts(wheel, tmp_path):
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test_deps.pth").write_text(str(_deps_folder(tmp_path)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index",
         f"{wheel}[torch]"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    work = tmp_path / "work"  # outside the checkout, so only the installed wheel is importable
    work.mkdir()
    check = (
        "import optax_selective as osel, torch_bridge, selective_optimizers\n"
        "from selective_optimizers.wrap import get_selective_optimizer\n"
        "from selective_optimizers.load_store import load_weights_from_summary\n"
        "for m in (osel, torch_bridge, selective_optimizers):\n"
        f"    assert m.__file__.startswith({purelib!r}), m.__file__\n"
        "print('imports from', osel.__file__)\n")
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True, timeout=600,
                       env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    for title, code in quick_starts().items():
        r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=600,
                           env=env, cwd=work)
        assert r.returncode == 0, f"{title}:\n{r.stderr[-3000:]}"
