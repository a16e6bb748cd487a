"""The real selective-optimizers distribution installed over our `selective_optimizers` path."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torch_bridge._install import foreign_distribution

ROOT = Path(__file__).resolve().parents[1]


def _site(tmp_path, *, foreign_record: bool, same_folder: bool = True) -> Path:
    """A site-packages folder with our package, and optionally 0.4's metadata claiming it."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "selective_optimizers", site / "selective_optimizers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if foreign_record:
        meta_root = site if same_folder else tmp_path / "elsewhere"
        info = meta_root / "selective_optimizers-0.4.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: selective-optimizers\nVersion: 0.4\n")
        (info / "RECORD").write_text(
            "selective_optimizers/__init__.py,,\nselective_optimizers/wrap.py,,\n"
            "selective_optimizers-0.4.dist-info/METADATA,,\n")
    return site


def test_foreign_distribution_found_when_it_owns_our_folder(tmp_path):
    site = _site(tmp_path, foreign_record=True)
    assert foreign_distribution(search_path=[str(site)]) == "selective-optimizers 0.4"


def test_no_foreign_distribution_alone(tmp_path):
    site = _site(tmp_path, foreign_record=False)
    assert foreign_distribution(search_path=[str(site)]) is None


def test_foreign_distribution_elsewhere_is_no_collision(tmp_path):
    # 0.4 installed into its own folder (pip --target, as the benchmarks do) shares no files
    site = _site(tmp_path, foreign_record=True, same_folder=False)
    other = tmp_path / "elsewhere"
    assert foreign_distribution(search_path=[str(site), str(other)]) is None


@pytest.mark.side
@pytest.mark.slow
def test_importing_torch_bridge_warns_and_says_what_to_do(tmp_path):
    site = _site(tmp_path, foreign_record=True)
    code = ("import warnings; warnings.simplefilter('always');\n"
            "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2])\n"
            "import selective_optimizers, torch_bridge\n"
            "assert selective_optimizers.__file__.startswith(sys.argv[1]), selective_optimizers.__file__\n")
    r = subprocess.run([sys.executable, "-c", code, str(site), str(ROOT)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "selective-optimizers 0.4" in r.stderr
    assert "pip uninstall -y selective-optimizers optax-selective" in r.stderr
