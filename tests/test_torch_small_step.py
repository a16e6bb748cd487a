"""The compact ID3 step below the leafwise size: one whole-model JAX call per step whose masks
stay on the JAX side (donated to XLA, not copied) and whose new entries reach the slot buffers
in one batch, with the same selection and parameters as the dense form."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from optax_selective._tree import LeafLayout  # noqa: E402
from optax_selective.methods import ID3  # noqa: E402
from torch_bridge import get_selective_optimizer  # noqa: E402
from torch_bridge.compact import CompactState  # noqa: E402
from torch_bridge.jax_interop import MethodRunner  # noqa: E402

SHAPES = ((7, 9), (9,), (9, 3), (3,))


def make_params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def make_opt(params, compact):
    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    return cls(params, lr=0.01, weight_decay=0.1, budget=30, max_steps=4, compact=compact)


def test_compact_id3_keeps_its_masks_in_jax_and_donates_them():
    params, dense_params = make_params(), make_params()
    opt, dense = make_opt(params, True), make_opt(dense_params, False)
    assert opt._leafwise is None  # the whole-model program (below leafwise.CHUNK entries)
    set_grads(params, 1)
    opt.step()
    assert all(m is None for m in opt._masks)  # no torch copy or view of the masks
    held = dict(opt._runner._jax_masks)
    assert sorted(held) == [0, 1, 2, 3]
    assert opt.state_nbytes() >= sum(p.numel() for p in params)  # the held masks still count
    set_grads(params, 2)
    opt.step()
    assert all(held[i].is_deleted() for i in held)  # XLA wrote the new masks over them
    for t in (3, 4, 5):
        set_grads(params, t)
        opt.step()
    for t in range(1, 6):
        set_grads(dense_params, t)
        dense.step()
    for a, b in zip(params, dense_params):
        assert torch.equal(a, b)
    for a, b in zip(opt.get_masks(), dense.get_masks()):
        assert torch.equal(a, b)
    assert opt.get_budget_used() == dense.get_budget_used() == 30


def test_masks_handed_to_torch_are_copied_before_the_next_update_donates():
    w, b = torch.randn(6, 5), torch.randn(5)
    layout = LeafLayout(("w", "b"), ((6, 5), (5,)), (True, True), (False, False))
    runner = MethodRunner(ID3(budget=8, max_steps=4), layout, [w, b])
    masks = runner.init([w, b])
    gw, gb = torch.randn(6, 5), torch.randn(5)
    leaf, index = runner.update_entries(0, [0, 1], masks, [gw, gb], [w, b])
    assert leaf.dtype == index.dtype == np.int64 and len(leaf) == 2  # k = 8 / 4
    seen = runner.torch_masks([0, 1], [w, b])
    assert sorted(zip(leaf.tolist(), index.tolist())) == sorted(
        (i, j) for i in (0, 1) for j in torch.nonzero(seen[i].reshape(-1)).view(-1).tolist()
    )
    before = {i: m.clone() for i, m in seen.items()}
    runner.update_entries(1, [0, 1], [None, None], [gw, gb], [w, b])
    for i in (0, 1):
        assert torch.equal(seen[i], before[i])  # torch's view still shows the old mask
    after = runner.torch_masks([0, 1], [w, b])
    assert sum(int(m.sum()) for m in after.values()) == 4


def test_add_entries_gives_the_slots_leaf_by_leaf_add_gives():
    params = [torch.zeros(10), torch.zeros(5), torch.zeros(8), torch.zeros(4, dtype=torch.float64)]
    groups = [0, 0, 1, 0]  # three buffers: (0, f32) for leaves 0 and 1, (1, f32), (0, f64)
    batch, single = (CompactState(params, groups, [True] * 4, [False] * 4, 20) for _ in range(2))
    for leaves, idx in (([2, 0, 1, 0, 3, 2, 1], [3, 4, 0, 9, 1, 1, 2]), ([0, 2, 0], [1, 7, 2])):
        leaves, idx = np.array(leaves, np.int64), np.array(idx, np.int64)
        batch.add_entries(leaves, idx)
        for leaf in sorted(set(leaves.tolist())):  # ascending leaves, given order within one
            single.add(leaf, torch.from_numpy(idx[leaves == leaf]))
    for a, b in zip(batch.state_dict(), single.state_dict()):
        assert torch.equal(a["leaves"], b["leaves"]) and torch.equal(a["indices"], b["indices"])
    for leaf in range(4):
        assert torch.equal(batch.indices_of(leaf), single.indices_of(leaf))
    assert batch.indices_of(0).tolist() == [4, 9, 1, 2]
