"""Selection methods, one module each; see ``_base.Method`` for the interface."""

from optax_selective.methods._base import Method
from optax_selective.methods.bitfit import BitFit, default_is_bias
from optax_selective.methods.fft import FFT
from optax_selective.methods.fish import Fish, FishState
from optax_selective.methods.id3 import ID3, ID3State
from optax_selective.methods.pafi import PaFI
from optax_selective.methods.random import RandomMask

__all__ = [
    "Method",
    "ID3",
    "ID3State",
    "PaFI",
    "BitFit",
    "FFT",
    "Fish",
    "FishState",
    "RandomMask",
    "default_is_bias",
]
