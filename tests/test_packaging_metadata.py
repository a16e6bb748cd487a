"""pyproject.toml's metadata says what is true: the Python tested, the license, the typing."""

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optax_selective", "torch_bridge", "selective_optimizers")


def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_the_python_running_the_tests_is_a_declared_version():
    classifiers = project()["classifiers"]
    minor = f"Programming Language :: Python :: {sys.version_info.major}.{sys.version_info.minor}"
    assert minor in classifiers, f"the suite runs on {minor.rsplit(' ', 1)[1]}: declare it"
    lowest = min(tuple(map(int, c.rsplit(" ", 1)[1].split("."))) for c in classifiers
                 if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert project()["requires-python"] == f">={lowest[0]}.{lowest[1]}"


def test_the_license_is_one_spdx_expression_with_its_full_text():
    meta = project()
    # PEP 639: the expression replaces "License ::" classifiers (setuptools refuses both)
    assert not [c for c in meta["classifiers"] if c.startswith("License ::")]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it


def test_typed_packages_ship_py_typed():
    assert "Typing :: Typed" in project()["classifiers"]
    for pkg in PACKAGES:
        assert (ROOT / pkg / "py.typed").is_file(), pkg
