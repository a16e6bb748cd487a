"""Shared test set-up: JAX on CPU, small shapes, deterministic hypothesis, and the tests that
need 8 simulated devices run in a child pytest (reported here one by one)."""

import gc
import importlib.util
import json
import os
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
        # Here: nothing ran (the child did). In the child: small programs that the next test
        # compiles again (shard_map steps on 8 devices), so keep them.
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


# ----------------------------------------------------------------- tests on 8 simulated devices
# jax fixes its device count when it is first imported, and this process has one device. Tests
# marked ``eight_devices`` are collected and reported here as usual, but their bodies run in one
# child pytest started with 8 CPU devices as soon as collection is done (it runs alongside the
# rest of the suite); each test here then reports the child's outcome for the same node id.

EIGHT_DEVICES_REPORT = "OSEL_EIGHT_DEVICES_REPORT"  # set in the child: where it writes results
EIGHT_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
CHILD_TIMEOUT_S = 1800


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "eight_devices: runs in a child pytest with 8 simulated CPU devices"
    )


class _EightDevicesRun:
    """The child pytest: started once; each test waits only until the child has finished
    that test (the child runs them in collection order while this process runs the rest)."""

    def __init__(self, nodeids):
        self.folder = tempfile.mkdtemp(prefix="osel_eight_devices_")
        self.report = os.path.join(self.folder, "report.jsonl")
        self.log = open(os.path.join(self.folder, "output.txt"), "w+")
        env = dict(os.environ, JAX_PLATFORMS="cpu", **{EIGHT_DEVICES_REPORT: self.report})
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {EIGHT_DEVICES_FLAG}".strip()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--no-header", "-rN", *nodeids]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.deadline = time.monotonic() + CHILD_TIMEOUT_S
        self.results, self.finished, self.read_upto = {}, set(), 0

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
                # A failed setup or teardown counts against the test, like in-process.
                if row["outcome"] != "passed" or row["nodeid"] not in self.results:
                    self.results[row["nodeid"]] = row
                if row["when"] == "teardown":
                    self.finished.add(row["nodeid"])

    def result(self, nodeid):
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
        return self.results.get(nodeid)

    def output_tail(self):
        self.log.seek(0)
        return self.log.read()[-6000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def pytest_collection_finish(session):
    # Everything alive now (torch, jax, transformers, the collected tests) lives for the whole
    # run: moved out of the collector's reach, each gc.collect() (after every module and slow
    # test, and Python's own full collections) no longer walks it: ~0.3 s -> ~0.01 s each.
    gc.collect()
    gc.freeze()
    if os.environ.get(EIGHT_DEVICES_REPORT):  # the child itself
        import jax

        if jax.device_count() != 8:
            raise pytest.UsageError(
                f"the eight_devices tests need 8 devices, found {jax.device_count()}: "
                f"set XLA_FLAGS={EIGHT_DEVICES_FLAG} before jax is imported"
            )
        return
    nodeids = [i.nodeid for i in session.items if i.get_closest_marker("eight_devices")]
    if nodeids and not session.config.option.collectonly:
        session.config._eight_devices = _EightDevicesRun(nodeids)


def pytest_sessionfinish(session):
    run = getattr(session.config, "_eight_devices", None)
    if run is not None:
        run.close()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    run = getattr(pyfuncitem.config, "_eight_devices", None)
    if run is None or not pyfuncitem.get_closest_marker("eight_devices"):
        return None
    row = run.result(pyfuncitem.nodeid)
    if row is None:
        pytest.fail(
            f"the 8-device child pytest reported nothing for {pyfuncitem.nodeid} "
            f"(exit {run.proc.returncode}):\n{run.output_tail()}",
            pytrace=False,
        )
    if row["outcome"] == "skipped":
        pytest.skip(row["message"])
    if row["outcome"] == "failed":
        pytest.fail(f"[in the 8-device child, {row['when']}]\n{row['message']}", pytrace=False)
    return True


def pytest_runtest_logreport(report):
    path = os.environ.get(EIGHT_DEVICES_REPORT)
    if not path or (report.when == "setup" and report.passed):
        return  # every test's teardown row is written: it tells the parent the test is done
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2]
    else:
        message = report.longreprtext
    with open(path, "a") as f:
        row = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
               "message": message}
        f.write(json.dumps(row) + "\n")
