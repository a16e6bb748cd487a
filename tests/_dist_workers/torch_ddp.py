"""One rank of a 2-process DDP run (gloo, CPU) with the selective AdamW of the bridge.

Usage: python -m tests._dist_workers.torch_ddp RANK WORLD_SIZE PORT OUT_DIR

Every rank trains ``DDP(model)`` on its own batch with
``get_selective_optimizer(torch.optim.AdamW, "id3")`` and, after every step, checks with an
``all_gather`` that all ranks hold the same masks; it writes its masks and final parameters to
``OUT_DIR/ddp_rank<RANK>.npz``. Rank 0 writes the summary to ``OUT_DIR/summary.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torch_bridge
from tests._dist_workers import torch_common as tc


def main(rank: int, world: int, port: int, out_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tc.make_model()
    ddp = DistributedDataParallel(model)
    opt = tc.selective_adamw(ddp.parameters())
    batch = tc.batches(world)[rank]
    record = {}
    for t in range(tc.STEPS):
        opt.zero_grad()
        tc.loss_fn(ddp, batch).backward()  # DDP averages the gradients over the ranks
        opt.step()
        flat = torch.cat([m.reshape(-1) for m in opt.get_masks()]).to(torch.uint8)
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        for r, other in enumerate(every):
            assert torch.equal(other, flat), f"step {t}: rank {r}'s masks differ from rank {rank}'s"
        for (name, _), m in zip(model.named_parameters(), opt.get_masks()):
            record[f"mask{t + 1}/{name}"] = m.numpy().copy()
    for name, p in model.named_parameters():
        record[f"params/{name}"] = p.detach().numpy().copy()
    np.savez(out_dir / f"ddp_rank{rank}.npz", **record)
    if rank == 0:
        torch_bridge.write_summary_to_disk(out_dir / "summary.pt", opt.get_summary(model))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
