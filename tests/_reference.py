"""Numpy references shared by the selection tests."""

import numpy as np


def numpy_top_k(scores, k):
    """Masks of the k best finite scores over all arrays together, by (score desc, global index
    asc), ``-0.0 == 0.0``; ``None`` entries take no part and stay ``None``."""
    live = [s for s in scores if s is not None]
    flat = np.concatenate([s.reshape(-1) for s in live]) if live else np.zeros(0, np.float32)
    finite = np.isfinite(flat)
    order = np.lexsort((np.arange(flat.size), -np.where(finite, flat, -np.inf)))
    chosen = np.zeros(flat.size, bool)
    chosen[[i for i in order if finite[i]][:k]] = True
    out, off = [], 0
    for s in scores:
        if s is None:
            out.append(None)
            continue
        out.append(chosen[off : off + s.size].reshape(s.shape))
        off += s.size
    return out
