"""optax-selective: selective parameter-efficient fine-tuning as optax transformations.

Only a fixed budget of scalar parameters may ever change; the rest stay bit-identical, and
the changed entries ship as a small :class:`SparseSummary`.
"""

from optax_selective._version import __version__
from optax_selective.adapters import (
    AdapterError,
    AttachedSummary,
    Pretrained,
    attach,
    load_pretrained,
    merge_summaries,
    read_pretrained,
    save_pretrained,
)
from optax_selective.inspect import (
    BudgetShortfallWarning,
    budget_used,
    find_selective_state,
    selected_mask,
)
from optax_selective.restore import StateValidationError, validate_state
from optax_selective.summary import (
    SparseSummary,
    SummaryFormatError,
    SummaryLeaf,
    apply_summary,
    load_summary,
    make_summary,
    save_summary,
)
from optax_selective.summary.signing import SignatureError, sign, verify_signature
from optax_selective.transform import (
    SelectiveState,
    selective,
    selective_bitfit,
    selective_fft,
    selective_fish,
    selective_id3,
    selective_pafi,
    selective_random,
)
from optax_selective.verify import VerificationError, verify

__all__ = [
    "__version__",
    "SelectiveState",
    "selective",
    "selective_id3",
    "selective_pafi",
    "selective_bitfit",
    "selective_fft",
    "selective_fish",
    "selective_random",
    "selected_mask",
    "budget_used",
    "find_selective_state",
    "BudgetShortfallWarning",
    "verify",
    "VerificationError",
    "validate_state",
    "StateValidationError",
    "sign",
    "verify_signature",
    "SignatureError",
    "SparseSummary",
    "SummaryLeaf",
    "SummaryFormatError",
    "make_summary",
    "apply_summary",
    "save_summary",
    "load_summary",
    "save_pretrained",
    "load_pretrained",
    "read_pretrained",
    "Pretrained",
    "attach",
    "AttachedSummary",
    "merge_summaries",
    "AdapterError",
]
