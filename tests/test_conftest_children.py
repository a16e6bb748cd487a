"""The child pytests of ``tests/conftest.py``: a test run in the side child is reported in the
main run with its real outcome, message, captured output and duration, after the main
process's own tests, and a child that dies is reported, not waited for."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.side  # it runs pytest in processes of its own

ROOT = Path(__file__).resolve().parents[1]

TESTS = '''
import os
import pytest

@pytest.mark.side
def test_side_fails():
    print("said in the child", os.getpid())
    assert 1 == 2, "failed in the side child"

@pytest.mark.side
def test_side_skips():
    pytest.skip("skipped in the side child")

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke in the side child")

@pytest.mark.side
def test_side_fixture_error(broken):
    pass

@pytest.mark.side
def test_side_passes(tmp_path):
    assert tmp_path.exists() and os.environ.get("OSEL_CHILD_KIND") == "side"

@pytest.mark.side
def test_side_dies():
    os._exit(3)

@pytest.mark.side
def test_side_after_the_death():
    pass

def test_main_runs_here():
    assert "OSEL_CHILD_KIND" not in os.environ
'''


def test_side_child_reports_every_outcome_and_a_death(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (tmp_path / "test_children.py").write_text(textwrap.dedent(TESTS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSEL_CHILD")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), "test_children.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "3 failed, 2 passed, 1 skipped, 1 error" in out, out
    # the main process's own test first, then the child's, in their order
    order = [out.index(f"test_children.py::{name} ") for name in (
        "test_main_runs_here", "test_side_fails", "test_side_skips", "test_side_dies")]
    assert order == sorted(order), out
    assert "failed in the side child" in out and "assert 1 == 2" in out  # the traceback
    assert "said in the child" in out  # captured output
    assert "SKIPPED [1] test_children.py" in out and "skipped in the side child" in out
    assert "fixture broke in the side child" in out
    for name in ("test_side_dies", "test_side_after_the_death"):  # failed, not waited for
        assert f"the side child pytest reported nothing for test_children.py::{name}" in out
