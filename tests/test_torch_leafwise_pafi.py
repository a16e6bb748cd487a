"""PaFI's fixed mask chosen one parameter (chunk) at a time: the entries of the whole-model
program (``PaFI.init``, as ``selective_pafi`` runs it), ties and all."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from optax_selective._tree import LeafLayout  # noqa: E402
from optax_selective.methods import PaFI  # noqa: E402
from tests._reference import numpy_top_k  # noqa: E402
from torch_bridge import get_selective_optimizer, leafwise  # noqa: E402
from torch_bridge.jax_interop import MethodRunner  # noqa: E402
from torch_bridge.leafwise import choose_fixed_mask  # noqa: E402

SHAPES = ((6, 5), (5,), (5, 7), (7,), (3, 3))


def tied_params(dtype, seed=0):
    """Few distinct magnitudes, so most of the k-th smallest are ties across leaves and chunks;
    -0.0 next to 0.0, and non-finite entries (never chosen)."""
    g = torch.Generator().manual_seed(seed)
    ps = [(torch.randint(-3, 4, s, generator=g) * 0.25).to(dtype) for s in SHAPES]
    ps[0].view(-1)[[2, 11]] = -0.0
    ps[2].view(-1)[3] = float("nan")
    ps[2].view(-1)[5] = float("-inf")
    ps[3].view(-1)[0] = float("inf")
    return [torch.nn.Parameter(p) for p in ps]


def whole_model(method, params, selectable, choose_all):
    layout = LeafLayout(tuple(map(str, range(len(params)))), tuple(tuple(p.shape) for p in params),
                        tuple(selectable), tuple(choose_all))
    return MethodRunner(method, layout, params).init(params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1 << 24])
@pytest.mark.parametrize("budget", [40, 12])  # 12: the candidates are merged several times
def test_chosen_entries_equal_the_whole_model_program(dtype, chunk, budget):
    params = tied_params(dtype)
    selectable = [True, True, True, False, True]  # leaf 3 choose_all
    choose_all = [False, False, False, True, False]
    method = PaFI(budget=budget)
    k = method.effective_budget(LeafLayout(tuple("abcde"), tuple(tuple(p.shape) for p in params),
                                           tuple(selectable), tuple(choose_all)))
    assert k == budget - 7
    got = choose_fixed_mask(method, params, selectable, k, chunk=chunk)
    want = whole_model(method, params, selectable, choose_all)
    scores = [-np.abs(p.detach().float().numpy()) if ok else None
              for p, ok in zip(params, selectable)]
    ref = numpy_top_k(scores, k)
    for i, ok in enumerate(selectable):
        idx = got.get(i, torch.zeros(0, dtype=torch.int64))
        assert idx.dtype == torch.int64
        assert torch.equal(idx, torch.sort(idx).values)  # in index order, as add_mask gives
        if ok:
            assert idx.tolist() == torch.nonzero(want[i].reshape(-1)).view(-1).tolist()
            assert idx.tolist() == np.flatnonzero(ref[i]).tolist()
        else:
            assert i not in got
    assert sum(v.numel() for v in got.values()) == k  # the ties decided by index, not all taken


def test_fewer_finite_entries_than_the_budget():
    params = [torch.tensor([float("nan"), 1.0, float("inf")]), torch.tensor([2.0, float("nan")])]
    got = choose_fixed_mask(PaFI(budget=4), params, [True, True], 4, chunk=2)
    assert {i: v.tolist() for i, v in got.items()} == {0: [1], 1: [0]}


def run(stream, dtype=torch.float32, choose_all=True, budget=40, steps=3):
    params = tied_params(dtype, seed=1)
    with torch.no_grad():  # finite weights, still tied, so the optimizer can train
        for p in params:
            p.nan_to_num_(0.5, 0.75, -0.75)
    groups = [{"params": params[:3]}, {"params": [params[3]], "choose_all": choose_all},
              {"params": [params[4]], "lr": 0.05}]
    opt = get_selective_optimizer(torch.optim.AdamW, "pafi")(
        groups, lr=0.01, weight_decay=0.1, stream_grads=stream, budget=budget)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(2, 6, generator=g).to(dtype)
        h = (x @ params[0] + params[1]) @ params[2] + params[3]
        (h[:, :3] @ params[4]).float().square().sum().backward()
        opt.step()
    return opt, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("choose_all", [True, False])
def test_optimizer_leafwise_init_equals_whole_model_init(monkeypatch, dtype, choose_all):
    base = run(False, dtype, choose_all)  # small model, no streaming: the whole-model program
    monkeypatch.setattr(leafwise, "CHUNK", 4)  # every leaf in several chunks

    def whole_model_init(*a):
        raise AssertionError("stream_grads=True must choose PaFI's mask leafwise")

    monkeypatch.setattr(MethodRunner, "init", whole_model_init)
    streamed = run(True, dtype, choose_all)
    for a, b in zip(base[1], streamed[1]):
        assert torch.equal(a, b)
    for a, b in zip(base[0].get_masks(), streamed[0].get_masks()):
        assert torch.equal(a, b)
    sa, sb = base[0].state_dict()["selective"], streamed[0].state_dict()["selective"]
    for a, b in zip(sa["compact"], sb["compact"]):  # the same slots in the same order
        assert torch.equal(a["leaves"], b["leaves"]) and torch.equal(a["indices"], b["indices"])
    assert streamed[0].get_budget_used() == 40


def test_budget_spent_by_choose_all_and_budget_checks(monkeypatch):
    monkeypatch.setattr(leafwise, "CHUNK", 4)
    opt, params = run(True, budget=7, steps=1)  # choose_all leaf 3 has 7 entries
    assert opt.get_budget_used() == 7
    assert [int(m.sum()) for m in opt.get_masks()] == [0, 0, 0, 7, 0]
    with pytest.raises(ValueError, match="pafi"):
        run(True, budget=10**6, steps=0)


@pytest.mark.parametrize("chunk,bin_cap", [(3, 0), (3, 1 << 20), (1 << 22, 0), (1 << 22, 1 << 20)])
def test_threshold_inside_a_high_digit_bin_with_ties_and_subnormals(monkeypatch, chunk, bin_cap):
    """float32 magnitudes that share their top 16 key bits (so the low 16 bits decide),
    ties of the k-th value across leaves and chunks, subnormals, -0.0 and non-finite."""
    rng = np.random.default_rng(3)
    base = np.float32(1.0) + rng.integers(0, 40, 130).astype(np.float32) * np.float32(2**-23)
    sign = np.where(rng.random(130) < 0.5, -1, 1).astype(np.float32)
    flat = base * sign
    flat[[7, 60, 61]] = np.float32(1e-40) * np.array([1, -1, 1], np.float32)  # subnormal
    flat[[8, 90]] = [-0.0, 0.0]
    flat[[9, 100]] = [np.nan, -np.inf]
    params = [torch.from_numpy(flat[:50].copy()).reshape(5, 10), torch.from_numpy(flat[50:])]
    monkeypatch.setattr(leafwise, "_BIN_CAP", bin_cap)  # 0: the bin's second histogram
    # XLA:CPU flushes subnormals to zero in the score, so they tie with 0.0 (the whole-model
    # program and the leafwise passes alike); the NumPy reference flushes them too.
    tiny = np.finfo(np.float32).tiny
    scores = [-np.where(np.abs(p.numpy()) < tiny, 0, np.abs(p.numpy())) for p in params]
    for k in (1, 23, 64, 200):  # 200: more than the finite entries, so all of them
        got = choose_fixed_mask(PaFI(budget=k), params, [True, True], k, chunk=chunk)
        want = whole_model(PaFI(budget=k), params, [True, True], [False, False]) if k in (1, 23) else None
        ref = numpy_top_k(scores, k)
        for i in (0, 1):
            idx = got.get(i, torch.zeros(0, dtype=torch.int64)).tolist()
            assert idx == np.flatnonzero(ref[i]).tolist(), (k, i)
            if want is not None:
                assert idx == torch.nonzero(want[i].reshape(-1)).view(-1).tolist(), (k, i)
