"""The rows path of the top-k compiles no per-row tables into its program.

Per-row lookup tables (leaf, row in leaf, view) were NumPy arrays, i.e. constants of the
compiled program: megabytes of them for a large leaf, kept in memory with every compiled
program (the torch bridge compiles one per chunk shape). Per leaf they are a few integers.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from optax_selective import selection  # noqa: E402
from optax_selective.selection import topk  # noqa: E402


def program_text(shapes, k_max, score_fn=None):
    if score_fn is None:
        args = [jnp.zeros(s, jnp.float32) for s in shapes]
    else:
        args = [(jnp.zeros(s, jnp.bfloat16), jnp.ones(s, jnp.bfloat16)) for s in shapes]
    fn = jax.jit(lambda xs: selection.top_k_indices(xs, k_max, k_max, score_fn=score_fn))
    return fn.lower(args).as_text()


@pytest.mark.parametrize("score_fn", [None, lambda g, p: jnp.abs(g.astype(jnp.float32)) / p])
def test_rows_program_has_no_per_row_constants(score_fn):
    # 2**20 entries, k_max 64: rows of 128 entries, 8192 rows; a per-row int32 table would
    # print as at least 8192 numbers
    text = program_text([(1024, 1024)], 64, score_fn)
    assert topk._fast_path([(0, jnp.zeros((1024, 1024)))], 64) == "rows"
    assert len(text) < 60_000, len(text)
    # several leaves, small ones sharing one view (their rows are reordered in the program)
    text = program_text([(8,), (1024, 1024), (3, 5), (512, 2048)], 64, score_fn)
    assert len(text) < 80_000, len(text)


def test_rows_path_with_reordered_views_is_exact():
    rng = np.random.default_rng(0)
    shapes = [(8,), (256, 64), (3, 5), (128, 128), (7,)]
    xs = [jnp.asarray(rng.integers(-4, 5, s).astype(np.float32)) for s in shapes]  # many ties
    k = 200
    leaf, index, valid = selection.top_k_indices(xs, k, k)
    ref_leaf, ref_index, ref_valid = jax.jit(
        topk._top_k_reference_indices, static_argnums=2)(xs, k, k)
    got = sorted(zip(np.asarray(leaf)[np.asarray(valid)].tolist(),
                     np.asarray(index)[np.asarray(valid)].tolist()))
    want = sorted(zip(np.asarray(ref_leaf)[np.asarray(ref_valid)].tolist(),
                      np.asarray(ref_index)[np.asarray(ref_valid)].tolist()))
    assert got == want and len(got) == k
