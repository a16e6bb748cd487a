"""Compatibility import path for code written for selective-optimizers 0.4.

``selective_optimizers.wrap`` and ``selective_optimizers.load_store`` re-export
:mod:`torch_bridge`; nothing is implemented here.
"""

from selective_optimizers import load_store, wrap

__all__ = ["wrap", "load_store"]
