"""Keeps JAX from taking GPU memory that torch needs; imported before anything imports jax.

By default JAX pre-allocates 75% of every GPU it sees. The bridge only runs small selection
kernels, so it turns pre-allocation off (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) unless the
user already chose a setting. This only works if jax is not imported yet; if it was, the
user's process keeps whatever JAX was started with (set the variable yourself in that case).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
