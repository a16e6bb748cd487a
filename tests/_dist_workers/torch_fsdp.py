"""One rank of a 2-process FSDP2 run (gloo, CPU) selecting with ``ShardedMethodRunner``.

Usage: python -m tests._dist_workers.torch_fsdp RANK WORLD_SIZE PORT OUT_DIR

For each method in ``torch_common.METHODS`` it shards a fresh model with ``fully_shard``,
trains ``STEPS`` steps and writes ``OUT_DIR/<method>_rank<RANK>.npz``: the full masks after
init and after every step and the final params (gathered with ``full_tensor()`` for the check
only; the selection itself never gathers), and the largest exchange the runner made. Then
it trains the same sharded model with the bridge's selective AdamW (``fsdp_adamw_rank*.npz``,
``fsdp_summary_rank*.pt``), once on an explicit mesh and once exactly as
``docs/guides/sharding.md`` writes it (``fully_shard`` per layer, then on the model, no mesh:
each call makes a mesh of its own; ``fsdp_doc_rank*.npz``, ``fsdp_doc_summary_rank*.pt``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from tests._dist_workers import torch_common as tc
from torch_bridge.distributed import ShardedMethodRunner


def main(rank: int, world: int, port: int, out_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    optimizer_run(rank, world, None, out_dir)  # first: no mesh made yet, as in a user's script
    mesh = init_device_mesh("cpu", (world,))
    for name, make in tc.METHODS.items():
        model = tc.make_model()
        layout = tc.layout_of(model)
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        assert all(isinstance(p, DTensor) for p in params)
        batch = tc.batches(world)[rank]

        def grads_of(model=model, batch=batch):
            model.zero_grad()
            tc.loss_fn(model, batch).backward()

        record = {}

        def on_step(t, masks, params=params, record=record, layout=layout):
            for n, m, p in zip(layout.paths, masks, params):
                assert isinstance(m, DTensor) and m.placements == p.placements, (n, m)
                assert m.to_local().shape == p.to_local().shape, n
                record[f"mask{t}/{n}"] = m.full_tensor().numpy()

        runner = ShardedMethodRunner(make(), layout, params)
        params, _ = tc.train(model, runner, grads_of, on_step)
        for n, p in zip(layout.paths, params):
            record[f"params/{n}"] = p.full_tensor().detach().numpy()
        record["max_all_gather_numel"] = np.int64(max(runner.exchanged, default=0))
        np.savez(out_dir / f"{name}_rank{rank}.npz", **record)
    optimizer_run(rank, world, mesh, out_dir)
    mixed_placements_run(rank, mesh, out_dir)
    dist.barrier()
    dist.destroy_process_group()


def mixed_placements_run(rank: int, mesh, out_dir: Path) -> None:
    """The runner alone on DTensors placed Shard(0) and Replicate() alternately."""
    layout, full, steps = tc.mixed_placement_problem()
    placements = [[Shard(0)], [Replicate()], [Shard(0)], [Replicate()]]
    params = [distribute_tensor(p, mesh, pl) for p, pl in zip(full, placements)]
    runner = ShardedMethodRunner(tc.MIXED_METHOD(), layout, params)
    masks = runner.init(params)
    record = {}
    for t, grads in enumerate(steps):
        dgrads = [distribute_tensor(g, mesh, pl) for g, pl in zip(grads, placements)]
        new = runner.update(t, range(len(params)), masks, dgrads, params)
        masks = [new[i] for i in range(len(params))]
        for n, m, p in zip(layout.paths, masks, params):
            assert m.placements == p.placements, n
            record[f"mask{t + 1}/{n}"] = m.full_tensor().numpy()
    np.savez(out_dir / f"mixed_rank{rank}.npz", **record)


def optimizer_run(rank: int, world: int, mesh, out_dir: Path) -> None:
    """The bridge's selective AdamW on the FSDP2 model (it picks ShardedMethodRunner).

    ``mesh=None``: sharded as the sharding guide writes it, with no mesh argument."""
    import torch_bridge

    model = tc.make_model()
    names = [n for n, _ in model.named_parameters()]
    if mesh is None:
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        meshes = [p.device_mesh for p in model.parameters()]
        assert len({id(m) for m in meshes}) > 1  # one mesh per call: equal, not the same object
    else:
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = tc.selective_adamw(model.parameters())
    batch = tc.batches(world)[rank]
    record = {}
    for t in range(tc.STEPS):
        opt.zero_grad()
        tc.loss_fn(model, batch).backward()
        opt.step()
        for n, m in zip(names, opt.get_masks()):
            record[f"mask{t + 1}/{n}"] = m.full_tensor().numpy()
    record["budget_used"] = np.int64(opt.get_budget_used())
    summary = opt.get_summary(model)
    state = opt.state_dict()
    opt.load_state_dict(state)  # masks rebuilt from whole-tensor indices, as shards
    for n, m in zip(names, opt.get_masks()):
        assert np.array_equal(m.full_tensor().numpy(), record[f"mask{tc.STEPS}/{n}"]), n
    for n, p in zip(names, model.parameters()):
        record[f"params/{n}"] = p.full_tensor().detach().numpy()
    tag = "doc" if mesh is None else "adamw"
    np.savez(out_dir / f"fsdp_{tag}_rank{rank}.npz", **record)
    summary_file = "fsdp_doc_summary" if mesh is None else "fsdp_summary"
    torch_bridge.write_summary_to_disk(out_dir / f"{summary_file}_rank{rank}.pt", summary)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
