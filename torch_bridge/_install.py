"""Detects the real ``selective-optimizers`` distribution installed over our import path.

optax-selective ships a top-level ``selective_optimizers`` package (the 0.4 import path,
re-exporting :mod:`torch_bridge`). The ``selective-optimizers`` distribution on PyPI owns a
package of the same name, so installing both into one environment makes pip overwrite one
package's files with the other's, silently, and uninstalling either afterwards deletes files
the other one needs. :func:`foreign_distribution` finds that situation from the installed
metadata (which distribution's RECORD lists files in the folder ``selective_optimizers``
is imported from); importing :mod:`torch_bridge` warns about it once.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import warnings

FOREIGN = "selective-optimizers"

FIX = (
    "optax-selective provides the `selective_optimizers` import path itself, so the two must not "
    "share an environment. Fix: `pip uninstall -y selective-optimizers optax-selective`, then "
    "install optax-selective alone (it runs code written for selective-optimizers 0.4 "
    "unchanged). To compare with the real 0.4 package, install it into its own folder "
    "(`pip install --no-deps --target DIR selective-optimizers==0.4`) or its own virtual "
    "environment."
)


def foreign_distribution(search_path: list[str] | None = None) -> str | None:
    """Names the foreign distribution that owns our ``selective_optimizers`` folder, if any.

    Args:
      search_path: the folders to search (default ``sys.path``), for tests.

    Returns:
      ``"selective-optimizers 0.4"`` (name and version) when an installed
      ``selective-optimizers`` distribution lists files in the same folder that
      ``selective_optimizers`` is imported from; ``None`` otherwise.

    Example:
      >>> foreign_distribution(search_path=[]) is None
      True
    """
    spec = importlib.machinery.PathFinder.find_spec("selective_optimizers", search_path)
    if spec is None or not spec.submodule_search_locations:
        return None
    ours = {os.path.realpath(p) for p in spec.submodule_search_locations}
    kwargs = {} if search_path is None else {"path": search_path}
    for dist in importlib.metadata.distributions(name=FOREIGN, **kwargs):
        if any(f.parts[:1] == ("selective_optimizers",) for f in dist.files or ()):
            folder = os.path.realpath(str(dist.locate_file("selective_optimizers")))
            if folder in ours:
                return f"{dist.metadata['Name']} {dist.version}"
    return None


def warn_if_foreign() -> None:
    """Warns once (at import) when :func:`foreign_distribution` finds a collision."""
    try:
        owner = foreign_distribution()
    except Exception:  # broken metadata must never stop the import; there is nothing to say
        return
    if owner is not None:
        warnings.warn(
            f"`selective_optimizers` is installed by both optax-selective and {owner}: pip "
            f"has overwritten one package's files with the other's. {FIX}",
            stacklevel=3,
        )
