"""torch.distributed: selections on sharded (FSDP2) parameters equal the single-process ones.

Two gloo processes on CPU shard a small model with ``fully_shard`` (uneven rows) and select
with ``torch_bridge.distributed.ShardedMethodRunner``; the reference here runs the shared JAX
method on whole tensors in one process, with the same (averaged) gradients.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests._dist_workers import torch_common as tc

pytestmark = pytest.mark.side  # torch.distributed ranks in processes of their own (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, out_dir: Path, world: int = WORLD) -> None:
    """Runs ``python -m module RANK WORLD PORT OUT_DIR`` for every rank; fails on any error."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(r), str(world), port, str(out_dir)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{out[-6000:]}"


class SingleProcessRunner:
    """The single-process selection: the shared JAX method over whole tensors."""

    def __init__(self, method, layout):
        self.method, self.layout, self.state = method, layout, None

    @staticmethod
    def _j(t):
        return jnp.asarray(t.detach().numpy())

    def init(self, params):
        masks, self.state = self.method.init([self._j(p) for p in params], self.layout)
        return [torch.from_numpy(np.array(m)) for m in masks]

    def update(self, count, active, masks, grads, params):
        ok = [i in active for i in range(len(params))]
        new, self.state = self.method.update(
            [self._j(m) for m in masks],
            self.state,
            jnp.int32(count),
            [self._j(g) if a else None for g, a in zip(grads, ok)],
            [self._j(p) for p in params],
            ok,
        )
        return {i: torch.from_numpy(np.array(new[i])) for i in active}


def reference(name: str, world: int = WORLD) -> dict:
    """The FSDP worker's training in one process, selecting with the JAX method."""
    model = tc.make_model()
    layout = tc.layout_of(model)
    params = list(model.parameters())
    data = tc.batches(world)

    def grads_of():
        per_rank = []
        for batch in data:
            model.zero_grad()
            tc.loss_fn(model, batch).backward()
            per_rank.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in per_rank) / world

    out = {}

    def on_step(t, masks):
        for n, m in zip(layout.paths, masks):
            out[f"mask{t}/{n}"] = m.numpy().copy()

    runner = SingleProcessRunner(tc.METHODS[name](), layout)
    params, _ = tc.train(model, runner, grads_of, on_step)
    for n, p in zip(layout.paths, params):
        out[f"params/{n}"] = p.detach().numpy().copy()
    return out


def assert_same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for key in want:
        g, w = np.asarray(got[key]), np.asarray(want[key])
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {key}"
        assert g.tobytes() == w.tobytes(), f"{what}: {key} differs ({int(np.sum(g != w))} entries)"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """One launch of the FSDP2 worker, shared by the tests below."""
    out = tmp_path_factory.mktemp("fsdp")
    launch("tests._dist_workers.torch_fsdp", out)
    return out


@pytest.mark.slow
def test_fsdp2_as_the_sharding_guide_writes_it_equals_ddp(fsdp_run):
    """``fully_shard(layer)`` per layer, then ``fully_shard(model)``, no mesh argument (as in
    docs/guides/sharding.md): each call makes its own (equal) mesh; the optimizer accepts
    them and trains bit for bit as DDP and one process do."""
    import torch_bridge

    guide = (ROOT / "docs/guides/sharding.md").read_text()
    assert "    fully_shard(layer)\nfully_shard(model)\n" in guide  # the pattern the worker runs
    want, ref_summary = adamw_reference()  # what the DDP test checks DDP against, bit for bit
    for r in range(WORLD):
        got = dict(np.load(fsdp_run / f"fsdp_doc_rank{r}.npz"))
        assert int(got.pop("budget_used")) == 60
        assert_same(got, want, f"FSDP2 as documented, rank {r}")
        summary = torch_bridge.load_summary_from_disk(fsdp_run / f"fsdp_doc_summary_rank{r}.pt")
        assert_same_summary(summary, ref_summary)


@pytest.mark.slow
def test_fsdp2_sharded_selection_equals_single_process(fsdp_run):
    import torch_bridge

    tmp_path = fsdp_run
    # The bridge's optimizer on FSDP2 parameters: same masks and summary as one process.
    want, ref_summary = adamw_reference()
    for r in range(WORLD):
        got = dict(np.load(tmp_path / f"fsdp_adamw_rank{r}.npz"))
        assert int(got.pop("budget_used")) == 60
        assert_same(got, want, f"FSDP2 selective AdamW rank {r}")
        summary = torch_bridge.load_summary_from_disk(tmp_path / f"fsdp_summary_rank{r}.pt")
        assert_same_summary(summary, ref_summary)
    # The runner alone on Shard(0) and Replicate() DTensors: the JAX method on whole tensors.
    layout, params, steps = tc.mixed_placement_problem()
    ref = SingleProcessRunner(tc.MIXED_METHOD(), layout)
    masks = ref.init(params)
    want = {}
    for t, grads in enumerate(steps):
        new = ref.update(t, list(range(len(params))), masks, grads, params)
        masks = [new[i] for i in range(len(params))]
        want.update({f"mask{t + 1}/{n}": m.numpy() for n, m in zip(layout.paths, masks)})
    assert sum(int(v.sum()) for k, v in want.items() if k.startswith("mask3/")) == 24
    for r in range(WORLD):
        assert_same(dict(np.load(tmp_path / f"mixed_rank{r}.npz")), want, f"mixed rank {r}")
    # The runner itself, for every method, against the JAX method on whole tensors.
    for name, make in tc.METHODS.items():
        want = reference(name)
        used = sum(int(v.sum()) for k, v in want.items() if k.startswith(f"mask{tc.STEPS}/"))
        assert used == make().budget, (name, used)
        for r in range(WORLD):
            got = dict(np.load(tmp_path / f"{name}_rank{r}.npz"))
            exchanged = int(got.pop("max_all_gather_numel"))
            assert_same(got, want, f"{name} rank {r}")
            # Only candidates travel: at most k_max (or PaFI's budget) per rank, never a leaf.
            k_max = make().budget if name != "id3" else -(-make().budget // make().max_steps)
            n_params = len(tc.layout_of(tc.make_model()).paths)  # the set-up exchanges row counts
            assert exchanged <= WORLD * max(k_max, n_params), (name, exchanged)


def averaged_grads(model, world: int = WORLD) -> None:
    """Sets ``p.grad`` to the mean over the ranks' batches, as DDP's all-reduce does."""
    per_rank = []
    for batch in tc.batches(world):
        model.zero_grad()
        tc.loss_fn(model, batch).backward()
        per_rank.append([p.grad.clone() for p in model.parameters()])
    for i, p in enumerate(model.parameters()):
        p.grad = sum(g[i] for g in per_rank) / world


def adamw_reference() -> tuple[dict, dict]:
    """The bridge's selective AdamW in one process: masks after every step, the final
    parameters, and the summary."""
    model = tc.make_model()
    opt = tc.selective_adamw(model.parameters())
    masks = {}
    for t in range(tc.STEPS):
        averaged_grads(model)
        opt.step()
        for (name, _), m in zip(model.named_parameters(), opt.get_masks()):
            masks[f"mask{t + 1}/{name}"] = m.numpy().copy()
    for name, p in model.named_parameters():
        masks[f"params/{name}"] = p.detach().numpy().copy()
    return masks, opt.get_summary(model)


def assert_same_summary(got: dict, ref: dict) -> None:
    assert got["budget_used"] == ref["budget_used"] == 60
    assert {k: v for k, v in got.items() if k != "params"} == {
        k: v for k, v in ref.items() if k != "params"
    }
    assert sorted(got["params"]) == sorted(ref["params"])
    for name, entry in ref["params"].items():
        for key, value in entry.items():
            other = got["params"][name][key]
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and torch.equal(other, value), (name, key)
            else:
                assert other == value, (name, key)


@pytest.mark.slow
def test_ddp_ranks_hold_identical_masks_and_rank0_summary_equals_single_process(tmp_path):
    import torch_bridge

    launch("tests._dist_workers.torch_ddp", tmp_path)
    want, ref_summary = adamw_reference()
    for r in range(WORLD):
        assert_same(dict(np.load(tmp_path / f"ddp_rank{r}.npz")), want, f"DDP rank {r}")
    got = torch_bridge.load_summary_from_disk(tmp_path / "summary.pt")
    assert_same_summary(got, ref_summary)
