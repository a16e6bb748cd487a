"""Shared test set-up: JAX on CPU, small shapes, deterministic hypothesis, and two child
pytests (tests that need 8 simulated devices; tests marked ``side``) that run alongside this
one and are reported here one by one."""

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile fast: the tests run small programs once or a few times, so compiling dominates.
# LLVM's optimisations off (about a third less CPU time for the whole suite), and XLA:CPU's
# older elemental emitters instead of the MLIR fusion emitters (their compile time is less
# than half: 6.0 s -> 2.6 s for eight compact-state steps). The XLA graph passes still run,
# and every program keeps its IEEE semantics. Set before jax is imported, and inherited by
# the tests' subprocesses (benchmarks run outside pytest are unaffected).
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests._memory import release_memory  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("ci")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "data", "saved_on_cuda")


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
    yield
    release_memory()


# Compiled programs pile up within a module (property tests compile for every new shape: one
# module reached 2.8 GB); above this resident size they are dropped after the test that ends.
RELEASE_ABOVE_BYTES = 3 << 29  # 1.5 GiB: above what the torch modules hold (<= 1.3 GB)


def _resident_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _release_memory_after_slow_tests(request):
    yield
    if _resident_bytes() > RELEASE_ABOVE_BYTES:
        release_memory()  # piled-up programs
    elif request.node.get_closest_marker("eight_devices"):
        # Small programs that the next test compiles again (shard_map steps on 8 devices).
        pass
    elif request.node.get_closest_marker("slow"):
        release_memory()  # end-to-end runs: models and large programs


@pytest.fixture(scope="session")
def cuda_fixture():
    """The folder written on an H100 and its make_fixture module (loaded by path)."""
    spec = importlib.util.spec_from_file_location(
        "make_fixture", os.path.join(CUDA_FIXTURE_DIR, "make_fixture.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return CUDA_FIXTURE_DIR, module


@pytest.fixture(scope="session")
def reference_0_4(tmp_path_factory):
    """A folder holding ``selective-optimizers==0.4`` (installed once per session, as the
    benchmarks install it); skips where pip cannot reach an index."""
    from benchmarks.runs import ReferenceUnavailable, install_reference

    try:
        return install_reference(tmp_path_factory.mktemp("selective_optimizers_0.4"))
    except ReferenceUnavailable as e:
        pytest.skip(str(e))


# ----------------------------------------------------------------- child pytests
# Two kinds of tests run in a child pytest started as soon as collection is done, alongside
# the rest of the suite, and are reported here (outcome, traceback, output and duration):
#
# * ``eight_devices``: jax fixes its device count when it is first imported, and this process
#   has one device; their child is started with 8 simulated CPU devices.
# * ``side``: the test's work runs in processes it starts (benchmark cases, writers, ranks,
#   a pip install), where this process would only wait, or it is a self-contained end-to-end
#   example run (MiniLM, ViT, the demo) sharing no model or compiled program with the rest.
#   Its child runs them on the second core while this process runs the rest. Started only
#   when some tests of this process are selected as well.
#
# Each child runs its tests in collection order; this process reports them after its own
# tests, each as soon as the child has finished it.

CHILD_REPORT = "OSEL_CHILD_REPORT"  # set in a child: the file it appends its reports to
CHILD_KIND = "OSEL_CHILD_KIND"
EIGHT_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
CHILD_KINDS = {  # kind -> XLA flag its child needs
    "eight_devices": EIGHT_DEVICES_FLAG,
    "side": None,
}
CHILD_TIMEOUT_S = 1800


_CONFIG = []  # the run's config, for the report hook that is not given it


def pytest_configure(config):
    _CONFIG[:] = [config]
    config.addinivalue_line(
        "markers", "eight_devices: runs in a child pytest with 8 simulated CPU devices"
    )
    config.addinivalue_line(
        "markers", "side: runs in a child pytest alongside the rest (work in its own "
        "subprocesses, or a self-contained end-to-end example run)"
    )


def _child_kind(item):
    """The child pytest that runs ``item`` (``None``: this process)."""
    return next((k for k in CHILD_KINDS if item.get_closest_marker(k)), None)


class _ChildRun:
    """One child pytest: started once; :meth:`reports` waits only until the child has
    finished the test asked for."""

    def __init__(self, kind, nodeids, rootdir):
        self.kind = kind
        self.folder = tempfile.mkdtemp(prefix=f"osel_{kind}_")
        self.report = os.path.join(self.folder, "report.jsonl")
        self.log = open(os.path.join(self.folder, "output.txt"), "w+")
        env = dict(os.environ, JAX_PLATFORMS="cpu", **{CHILD_REPORT: self.report, CHILD_KIND: kind})
        if CHILD_KINDS[kind]:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {CHILD_KINDS[kind]}".strip()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--no-header", "-rN", *nodeids]
        # node ids are relative to the run's root folder
        self.proc = subprocess.Popen(cmd, cwd=rootdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.deadline = time.monotonic() + CHILD_TIMEOUT_S
        self.rows, self.finished, self.read_upto = {}, set(), 0

    def _read_rows(self):
        if not os.path.exists(self.report):
            return
        with open(self.report) as f:
            f.seek(self.read_upto)
            for line in f:
                if not line.endswith("\n"):  # being written: read it next time
                    break
                self.read_upto += len(line)
                row = json.loads(line)
                self.rows.setdefault(row["nodeid"], []).append(row)
                if row["when"] == "teardown":
                    self.finished.add(row["nodeid"])

    def reports(self, nodeid):
        """The child's serialised reports (setup, call, teardown) of ``nodeid``; ``[]`` if the
        child ended or timed out without finishing it."""
        while True:
            self._read_rows()
            if nodeid in self.finished:
                break
            if self.proc.poll() is not None:
                self._read_rows()
                break
            if time.monotonic() > self.deadline:
                self.proc.kill()
                self.proc.wait()
                break
            time.sleep(0.1)
        return self.rows.get(nodeid, []) if nodeid in self.finished else []

    def output_tail(self):
        self.log.seek(0)
        return self.log.read()[-6000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):
    """Here (not in a child): the tests the children run go last, so this process runs its
    own tests first and only then collects the children's results."""
    if not os.environ.get(CHILD_REPORT):
        items.sort(key=lambda item: _child_kind(item) is not None)  # stable: order kept


def pytest_collection_finish(session):
    # Everything alive now (torch, jax, transformers, the collected tests) lives for the whole
    # run: moved out of the collector's reach, each gc.collect() (after every module and slow
    # test, and Python's own full collections) no longer walks it: ~0.3 s -> ~0.01 s each.
    gc.collect()
    gc.freeze()
    if os.environ.get(CHILD_REPORT):  # a child itself
        if os.environ.get(CHILD_KIND) == "eight_devices":
            import jax

            if jax.device_count() != 8:
                raise pytest.UsageError(
                    f"the eight_devices tests need 8 devices, found {jax.device_count()}: "
                    f"set XLA_FLAGS={EIGHT_DEVICES_FLAG} before jax is imported"
                )
        return
    if session.config.option.collectonly:
        return
    by_kind = {}
    for item in session.items:
        by_kind.setdefault(_child_kind(item), []).append(item.nodeid)
    if None not in by_kind:  # only side tests selected: nothing to overlap them with
        by_kind.pop("side", None)
    session.config._children = {
        kind: _ChildRun(kind, nodeids, session.config.rootpath)
        for kind, nodeids in by_kind.items() if kind is not None
    }


def pytest_sessionfinish(session):
    for run in getattr(session.config, "_children", {}).values():
        run.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Here: a test a child runs is reported from the child's reports (no fixtures here)."""
    run = getattr(item.config, "_children", {}).get(_child_kind(item))
    if run is None:
        return None
    hook = item.ihook
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    rows = run.reports(item.nodeid)
    if rows:
        for row in rows:  # a skip's (path, line, reason) came through JSON as a list
            if isinstance(row.get("longrepr"), list):
                row["longrepr"] = tuple(row["longrepr"])
        reports = [item.config.hook.pytest_report_from_serializable(config=item.config, data=row)
                   for row in rows]
    else:
        message = (f"the {run.kind} child pytest reported nothing for {item.nodeid} "
                   f"(exit {run.proc.returncode}):\n{run.output_tail()}")
        reports = [pytest.TestReport(item.nodeid, item.location, {}, "failed", message, "call")]
    for report in reports:
        hook.pytest_runtest_logreport(report=report)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_runtest_logreport(report):
    """In a child: every report goes to the parent (the teardown one tells it the test is done)."""
    path = os.environ.get(CHILD_REPORT)
    if not path:
        return
    row = _CONFIG[0].hook.pytest_report_to_serializable(config=_CONFIG[0], report=report)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
