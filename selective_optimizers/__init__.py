"""Compatibility import path for code written for selective-optimizers 0.4.

``selective_optimizers.wrap`` and ``selective_optimizers.load_store`` re-export
:mod:`torch_bridge`; nothing is implemented here.

The real ``selective-optimizers`` distribution owns a package of the same name: do not install
both into one environment (pip overwrites one's files with the other's, and uninstalling
either deletes the other's). Importing :mod:`torch_bridge` (which this package does) warns
when it finds that, and says how to fix it.
"""

from selective_optimizers import load_store, wrap

__all__ = ["wrap", "load_store"]
