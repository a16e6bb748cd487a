"""What the leafwise selection keeps in memory: few compiled programs, no compiler leftovers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from optax_selective.methods import ID3  # noqa: E402
from tests._reference import numpy_top_k  # noqa: E402
from torch_bridge import leafwise  # noqa: E402
from torch_bridge.leafwise import LeafwiseSelector  # noqa: E402


def test_a_leaf_is_cut_into_equal_chunks_and_selects_exactly():
    m = ID3(budget=12, max_steps=1)
    g = torch.from_numpy(np.random.default_rng(1).integers(-3, 4, 62).astype(np.float32))
    sel = LeafwiseSelector(m, [40, 22], chunk=16)  # 40 -> 3 x 14 (not 16, 16, 8); 22 -> 2 x 11
    assert sel._size.tolist() == [14, 11]
    sel.offer(1, g[40:], torch.ones(22))
    sel.offer(0, g[:40], torch.ones(40))
    got = sel.finish(12)
    want = numpy_top_k([np.abs(g[:40].numpy()), np.abs(g[40:].numpy())], 12)  # many ties
    for i in (0, 1):
        idx = got.get(i, (torch.zeros(0, dtype=torch.int64),))[0]
        assert sorted(idx.tolist()) == np.flatnonzero(want[i]).tolist()
    assert sum(len(v[0]) for v in got.values()) == 12


def test_equal_chunks_share_one_program_and_the_heap_is_trimmed_after_compiling():
    m = ID3(budget=300, max_steps=3)
    sel = LeafwiseSelector(m, [1234 * 8, 1234 * 8], chunk=1234 * 4)  # one chunk shape
    g, p = torch.randn(1234 * 8), torch.ones(1234 * 8)
    traces, trims = leafwise.TRACES[0], leafwise.TRIMS[0]
    sel.offer(0, g, p)
    # both chunks of the leaf: one row-maxima program, plus the one that scores gathered rows
    assert leafwise.TRACES[0] == traces + 2
    assert leafwise.TRIMS[0] == trims + (leafwise._MALLOC_TRIM is not None)
    sel.offer(1, g, p)
    sel.finish(100)
    assert leafwise.TRACES[0] == traces + 2  # the merges run in torch: nothing compiled
    trims = leafwise.TRIMS[0]
    sel.offer(0, g, p)
    sel.offer(1, g, p)
    sel.finish(100)
    assert leafwise.TRACES[0] == traces + 2 and leafwise.TRIMS[0] == trims  # nothing compiled
