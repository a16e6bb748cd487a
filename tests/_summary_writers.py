"""A summary writer run as a subprocess by the durability tests (kill -9, concurrent writers).

    python tests/_summary_writers.py {jax|torch} PATH TAG ENTRIES ROUNDS [--wait]

writes a summary of ENTRIES entries whose values all equal TAG (an int) to PATH, ROUNDS times
(overwriting), printing "ready" after the first write; with ROUNDS 0 it writes forever. With
``--wait`` it imports and builds the summary, then waits for a line on stdin before writing
(so a test can start writers ahead of time while another one runs).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def jax_writer(path, tag, n):
    import numpy as np

    import optax_selective as osel

    leaf = osel.SummaryLeaf("['w']", (n,), np.float32, np.arange(n, dtype=np.int32),
                            np.full(n, tag, np.float32))
    summary = osel.SparseSummary((leaf,), n, "pafi")
    return lambda: osel.save_summary(path, summary, overwrite=True)


def torch_writer(path, tag, n):
    import torch

    from torch_bridge import write_summary_to_disk
    from torch_bridge.summary import FORMAT, Summary

    summary = Summary(
        format=FORMAT, format_version=1, library_version="test", method="pafi", budget_used=n,
        num_params=1, buffers={},
        params={"w": {"position": 0, "shape": [n], "dtype": "float32",
                      "indices": torch.arange(n, dtype=torch.int32),
                      "values": torch.full((n,), float(tag))}},
    )
    return lambda: write_summary_to_disk(path, summary)


def main():
    framework, path, tag, n, rounds = sys.argv[1:6]
    write = (jax_writer if framework == "jax" else torch_writer)(path, int(tag), int(n))
    if "--wait" in sys.argv[6:] and not sys.stdin.readline():
        return  # the test ended (stdin closed) before telling this writer to start
    done = 0
    while True:
        write()
        done += 1
        if done == 1:
            print("ready", flush=True)
        if int(rounds) and done >= int(rounds):
            break


if __name__ == "__main__":
    main()
