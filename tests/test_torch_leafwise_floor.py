"""LeafwiseSelector drops candidates below the k_max-th best kept so far, exactly."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from optax_selective.methods import ID3  # noqa: E402
from tests._reference import numpy_top_k  # noqa: E402
from torch_bridge.leafwise import LeafwiseSelector  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_below_the_floor_nothing_is_kept_and_ties_at_it_still_go_to_the_lower_index(seed):
    m = ID3(budget=8, max_steps=2)
    k = int(m.k_max)
    g = torch.from_numpy(np.random.default_rng(seed).integers(0, 5, 300).astype(np.float32))
    g[250:] = 0.5  # a tail of chunks that is entirely below the floor
    sel = LeafwiseSelector(m, [200, 100], chunk=5)  # 60 chunks of 5, buffer of 5 * k_max
    pushed = []
    push = sel._push
    sel._push = lambda values, *rest: (pushed.append(len(values)), push(values, *rest))[1]
    sel.offer(0, g[:200], torch.ones(200))
    sel.offer(1, g[200:], torch.ones(100))
    assert sel._floor == 4.0  # the best value, held by more than k_max entries
    got = sel.finish(k)
    want = numpy_top_k([np.abs(g[:200].numpy()), np.abs(g[200:].numpy())], k)  # many ties
    for i in (0, 1):
        idx = got.get(i, (torch.zeros(0, dtype=torch.int64),))[0]
        assert sorted(idx.tolist()) == np.flatnonzero(want[i]).tolist()
    # without the floor every chunk pushes its best min(k_max, 5); with it, only ties of 4
    assert sum(pushed) < 60 * min(k, 5) / 2
    assert len(pushed) < 60  # chunks of the 0.5 tail push nothing
