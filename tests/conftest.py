"""Shared test set-up: JAX on CPU, small shapes, deterministic hypothesis."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("ci")


CUDA_FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "data", "saved_on_cuda")


@pytest.fixture(scope="session")
def cuda_fixture():
    """The folder written on an H100 and its make_fixture module (loaded by path)."""
    spec = importlib.util.spec_from_file_location(
        "make_fixture", os.path.join(CUDA_FIXTURE_DIR, "make_fixture.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return CUDA_FIXTURE_DIR, module
