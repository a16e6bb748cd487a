"""How long and how much memory loading a torch summary file takes, for files built to be
slow: many parameter entries (empty ones, as issue 28's attack file, or one entry each), long
names, and files over the caps (refused). Each case loads in a fresh child process, so its
peak RSS is its own.

    python -m benchmarks.summary_load [--quick]

prints one row per case: entries, file size, median load time of 3 runs and the peak resident
memory the load adds (``benchmarks.proc_memory``: high-water mark minus the resident size
before the load). The target (docs/security.md): under 1 s and 200 MiB for any
file under the caps (MAX_HEADER_BYTES, MAX_PARAMS).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def build(path: str, n: int, count: int, name_len: int) -> None:
    import torch

    from torch_bridge.summary import FORMAT, Summary, write_summary_to_disk

    pad = "x" * max(0, name_len - 8)
    params = {f"{pad}{i:08d}": {"position": i, "shape": [max(4, count)], "dtype": "float32",
                                "indices": torch.arange(count, dtype=torch.int32),
                                "values": torch.ones(count)} for i in range(n)}
    s = Summary(format=FORMAT, format_version=1, method="pafi", budget_used=n * count,
                num_params=n, params=params, buffers={})
    write_summary_to_disk(path, s)


def child(path: str, max_params: int | None) -> None:
    import torch_bridge
    from benchmarks.proc_memory import hwm, reset_hwm, rss

    times, peaks, outcome = [], [], "loaded"
    for _ in range(3):
        reset_hwm()
        base = rss()
        t = time.perf_counter()
        try:
            s = torch_bridge.load_summary_from_disk(path, max_params=max_params)
            outcome = f"loaded, {len(s['params'])} params"
            del s
        except torch_bridge.SummaryMismatchError as e:
            outcome = "refused: " + str(e).split(": ", 1)[1][:70]
        times.append(time.perf_counter() - t)
        peaks.append(hwm() - base)
    print(json.dumps({"s": statistics.median(times), "mib": max(peaks) / 2**20,
                      "outcome": outcome}))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], int(sys.argv[3]) if sys.argv[3] != "None" else None)
    quick = "--quick" in sys.argv
    from benchmarks.proc_memory import MALLOC_ENV
    from torch_bridge.summary import MAX_NAME_CHARS, MAX_PARAMS

    cases = [  # (label, entries, selected per entry, name length, max_params)
        ("MAX_PARAMS empty entries", MAX_PARAMS, 0, 16, None),
        ("MAX_PARAMS entries of 1", MAX_PARAMS, 1, 16, None),
        ("MAX_PARAMS entries of 64", MAX_PARAMS, 64, 16, None),
        ("header near its cap (long names)", 4_600, 0, MAX_NAME_CHARS, None),
        ("issue 28's file: 180,000 empty", 180_000, 0, 16, None),
        ("65,536 empty, max_params=65,536", 65_536, 0, 16, 65_536),
    ]
    if quick:
        cases = [(label, n // 16, c, k, m) for label, n, c, k, m in cases]
    print(f"{'case':34} {'entries':>8} {'file MiB':>9} {'load s':>7} {'peak MiB':>9}  outcome")
    env = {**os.environ, **MALLOC_ENV}
    with tempfile.TemporaryDirectory() as folder:
        for label, n, count, name_len, max_params in cases:
            path = os.path.join(folder, "s.safetensors")
            build(path, n, count, name_len)
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.summary_load", "--child", path,
                 str(max_params)], capture_output=True, text=True, check=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            mib = os.path.getsize(path) / 2**20
            print(f"{label:34} {n:>8} {mib:>9.1f} {r['s']:>7.2f} {r['mib']:>9.0f}  {r['outcome']}")


if __name__ == "__main__":
    main()
