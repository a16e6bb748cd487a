"""One of N JAX processes training with ID3 on a mesh spanning all of them.

Usage: python -m tests._dist_workers.jax_multiprocess PROCESS_ID NUM_PROCESSES PORT OUT_DIR [OPTS]

OPTS names one or more of ``common.optimizers()``, comma-separated (default ``OPTIMIZER``,
dense inner state); they train one after the other in the same processes (one start-up).

Started by tests/test_sharding.py with 2 CPU devices per process (XLA_FLAGS). For each
optimizer NAME, each process writes ``OUT_DIR/NAME/rank{PROCESS_ID}.npz`` (the global mask
after every step and the final params, gathered to every process) and all processes together
write one orbax checkpoint ``OUT_DIR/NAME/ckpt`` of the final params and optimizer state, and
one summary ``OUT_DIR/NAME/summary`` (``optax_selective.save_summary``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

OPTIMIZER = "id3_wrapper_adam_dense"


def main(process_id: int, num_processes: int, port: int, out_dir: Path, names: str = OPTIMIZER) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )
    for name in names.split(","):
        (out_dir / name).mkdir(exist_ok=True)
        train(process_id, num_processes, out_dir / name, name)
    jax.distributed.shutdown()


def train(process_id: int, num_processes: int, out_dir: Path, name: str) -> None:
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding

    import optax_selective as osel
    from tests._dist_workers import common

    n = jax.device_count()
    assert jax.process_count() == num_processes and n > jax.local_device_count(), n
    auto = (jax.sharding.AxisType.Auto,) * 2  # make_mesh's default in jax 0.10 is Explicit
    mesh = jax.make_mesh((num_processes, n // num_processes), ("data", "model"), axis_types=auto)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), common.specs())

    def global_array(host, sharding):  # every process holds the same host data (same seed)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    host_params, host_targets = common.make_params()
    params = jax.tree.map(global_array, host_params, shardings)
    targets = jax.tree.map(global_array, host_targets, shardings)

    tx = common.optimizers()[name]
    state = tx.init(params)  # eager: compact state must not read the masks on the host
    step = jax.jit(common.make_step(tx))
    gathered = {}

    def record(t, tree):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            gathered[f"{t}{jax.tree_util.keystr(path)}"] = np.asarray(
                multihost_utils.process_allgather(x, tiled=True)
            )

    record("mask0", osel.selected_mask(state))
    for t in range(common.STEPS):
        params, state = step(params, state, targets)
        mask = osel.selected_mask(state)
        for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params)):
            assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (m.sharding, p.sharding)
        record(f"mask{t + 1}", mask)
    record("params", params)
    np.savez(out_dir / f"rank{process_id}.npz", **gathered)

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(out_dir / "ckpt", {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
    summary = osel.make_summary(params, state)  # O(budget): only selected entries gathered
    osel.save_summary(out_dir / "summary", summary)
    multihost_utils.sync_global_devices(f"{name}: checkpoint written")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:])
