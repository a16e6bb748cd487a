"""Summary I/O under the 0.4 import path (re-exported from torch_bridge).

New files are plain dicts loaded with ``torch.load(weights_only=True)``; 0.4 files are read
with :func:`read_legacy_summary`, which does not unpickle arbitrary objects.
"""

from torch_bridge.legacy import convert_legacy_summary, read_legacy_summary
from torch_bridge.summary import (
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
]
