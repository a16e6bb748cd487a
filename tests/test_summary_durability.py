"""Saves survive kill -9 and concurrent writers (issue 13), in both frameworks.

Real writer subprocesses (tests/_summary_writers.py) overwrite one path with summaries whose
values all equal a tag; the test kills them with SIGKILL at several points, or runs two at
once while reading, and checks the path always holds one whole summary: the old one or a new
one, never a mix, never nothing.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.side  # writer processes (tests/conftest.py)

WRITER = Path(__file__).with_name("_summary_writers.py")
ROOT = Path(__file__).resolve().parents[1]
ENTRIES = 1_500_000  # a few MB: each write takes long enough to be killed in the middle


def writer(framework, path, tag, rounds, wait=False):
    """A writer process; with ``wait`` it starts writing when sent a line on stdin."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, str(WRITER), framework, str(path), str(tag), str(ENTRIES), str(rounds),
         *(["--wait"] if wait else [])],
        stdin=subprocess.PIPE if wait else subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def read_tag(framework, path):
    """The tag of the summary at ``path``; raises if it is not one whole summary."""
    if framework == "jax":
        import optax_selective as osel

        s = osel.load_summary(path)
        values = s.leaves[0].values
    else:
        from torch_bridge import load_summary_from_disk

        s = load_summary_from_disk(path)
        values = s["params"]["w"]["values"].numpy()
    assert s.budget_used == ENTRIES and values.shape == (ENTRIES,)
    tags = np.unique(values)
    assert tags.size == 1, f"a mix of summaries: {tags[:5]}"
    return int(tags[0])


def target(tmp_path, framework):
    return tmp_path / ("summary" if framework == "jax" else "summary.pt")


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_kill_9_during_overwrite_keeps_a_whole_summary(tmp_path, framework):
    path = target(tmp_path, framework)
    delays = (0.0, 0.03, 0.15, 0.4)
    first = writer(framework, path, 1, 1)
    # the writers to kill import meanwhile; each writes only when told, one at a time
    killed = [writer(framework, path, 2 + i, 0, wait=True) for i in range(len(delays))]
    try:
        assert first.wait(timeout=120) == 0, first.stderr.read()
        assert read_tag(framework, path) == 1
        seen = {1}
        for i, (p, delay) in enumerate(zip(killed, delays)):
            tag = 2 + i
            p.stdin.write("go\n")  # overwrites forever until killed
            p.stdin.flush()
            line = p.stdout.readline()
            assert line.strip() == "ready", p.stderr.read()
            time.sleep(delay)
            p.kill()  # SIGKILL: no cleanup, no finally blocks
            p.wait(timeout=60)
            got = read_tag(framework, path)
            assert got in seen | {tag}
            seen.add(got)
    finally:
        for p in killed:  # after a failure: none is left waiting or writing
            p.kill()
            p.wait(timeout=60)
    # leftovers of killed writers are hidden temporaries and never the summary itself
    leftovers = [n for n in os.listdir(tmp_path) if n != path.name]
    assert all(n.startswith(f".{path.name}.optax-selective-tmp-") for n in leftovers), leftovers


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_concurrent_writers_last_one_wins_cleanly(tmp_path, framework):
    path = target(tmp_path, framework)
    a, b = writer(framework, path, 7, 4), writer(framework, path, 8, 4)
    reads = 0
    while a.poll() is None or b.poll() is None:
        if os.path.exists(path):
            assert read_tag(framework, path) in (7, 8)  # every read sees one whole summary
            reads += 1
        time.sleep(0.05)
    assert a.returncode == 0, a.stderr.read()
    assert b.returncode == 0, b.stderr.read()
    assert read_tag(framework, path) in (7, 8) and reads > 0
    assert os.listdir(tmp_path) == [path.name]  # no temporaries left by finished writers
