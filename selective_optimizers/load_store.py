"""Summary I/O under the 0.4 import path (re-exported from torch_bridge).

New files are safetensors files; ``load_summary_from_disk`` also reads 0.4 files, through
:func:`read_legacy_summary`, which never hands the file to ``torch.load`` and runs nothing
from it (see docs/security.md).
"""

from torch_bridge.legacy import convert_legacy_summary, read_legacy_summary
from torch_bridge.summary import (
    Summary,
    SummaryMismatchError,
    load_summary_from_disk,
    load_weights_from_summary,
    write_summary_to_disk,
)

__all__ = [
    "write_summary_to_disk",
    "load_summary_from_disk",
    "load_weights_from_summary",
    "read_legacy_summary",
    "convert_legacy_summary",
    "SummaryMismatchError",
    "Summary",
]
