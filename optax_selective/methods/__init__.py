"""Selection methods, one module each, and the registry that names them.

``Method`` (with ``ShardedMethod`` for sharded torch runs and ``LeafwiseMethod`` /
``LeafwiseInitMethod`` for selection one parameter at a time) is the whole interface; see ``_base``. A method sees the
parameters' static :class:`LeafLayout`. Every built-in registers a factory here on import;
add your own with :func:`register` (``docs/guides/custom-methods.md``).
"""

from optax_selective._tree import LeafLayout
from optax_selective.methods._base import (
    Added,
    LeafwiseInitMethod,
    LeafwiseMethod,
    Method,
    ShardedMethod,
    ShardInit,
    check_int,
    check_nonnegative_number,
    choose_all_mask,
    require,
    required_budget,
)
from optax_selective.methods._registry import arguments, build, get, names, register, unregister
from optax_selective.methods.bitfit import BitFit, default_is_bias
from optax_selective.methods.fft import FFT
from optax_selective.methods.fish import Fish, FishState
from optax_selective.methods.id3 import ID3, ID3OptionsState, ID3State
from optax_selective.methods.pafi import PaFI
from optax_selective.methods.random import RandomMask

__all__ = [
    "Method",
    "ShardedMethod",
    "LeafwiseMethod",
    "LeafwiseInitMethod",
    "ShardInit",
    "Added",
    "LeafLayout",
    "check_int",
    "check_nonnegative_number",
    "choose_all_mask",
    "require",
    "required_budget",
    "register",
    "unregister",
    "get",
    "names",
    "arguments",
    "build",
    "ID3",
    "ID3State",
    "ID3OptionsState",
    "PaFI",
    "BitFit",
    "FFT",
    "Fish",
    "FishState",
    "RandomMask",
    "default_is_bias",
]
