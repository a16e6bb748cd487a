"""stream_grads=True and ID3's leafwise selection: the same entries and parameters as before."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from optax_selective.methods import ID3  # noqa: E402
from tests._reference import numpy_top_k  # noqa: E402
from torch_bridge import get_selective_optimizer, leafwise  # noqa: E402
from torch_bridge.leafwise import LeafwiseSelector  # noqa: E402

METHOD_KW = {
    "id3": {"budget": 40, "max_steps": 3},
    "pafi": {"budget": 40},
    "bitfit": {"budget": 40},
    "fish": {"budget": 40, "fish_steps": 2},
    "random": {"budget": 40, "seed": 3},
}
SHAPES = ((7, 9), (9,), (9, 13), (13,), (13, 3), (3,))


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in SHAPES]


def groups(params, choose_all=True):
    out = [{"params": params[:4]}, {"params": [params[4]], "lr": 0.05}]
    out.append({"params": [params[5]], "choose_all": choose_all})
    return out


def loss_fn(params, x):
    h = (x @ params[0] + params[1]).tanh()
    h = (h @ params[2] + params[3]).tanh()
    return (h @ params[4] + params[5]).float().square().sum()


def train(opt, params, steps=5, seed=1, accumulate=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            loss_fn(params, torch.randn(4, 7, generator=g).to(params[0].dtype)).backward()
        opt.step()


def run(method, stream, compact=True, dtype=torch.float32, choose_all=True, **kw):
    params = make_params(dtype)
    cls = get_selective_optimizer(torch.optim.AdamW, method)
    opt = cls(groups(params, choose_all), lr=0.01, weight_decay=0.1, compact=compact,
              stream_grads=stream, **{**METHOD_KW[method], **kw})
    train(opt, params)
    return opt, params


def assert_same(a, b):
    (oa, pa), (ob, pb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(oa.get_masks(), ob.get_masks()):
        assert torch.equal(x, y)
    assert oa.get_budget_used() == ob.get_budget_used()


@pytest.mark.parametrize("method", list(METHOD_KW))
@pytest.mark.parametrize("choose_all", [True, False])
def test_streaming_equals_compact_and_dense(method, choose_all):
    streamed = run(method, True, choose_all=choose_all)
    assert_same(streamed, run(method, False, choose_all=choose_all))
    assert_same(streamed, run(method, False, compact=False, choose_all=choose_all))
    assert streamed[0].get_budget_used() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", ["id3", "pafi"])
def test_streaming_dtypes(method, dtype):
    streamed = run(method, True, dtype=dtype)
    assert streamed[0].get_budget_used() > 0
    assert_same(streamed, run(method, False, dtype=dtype))
    assert_same(streamed, run(method, False, compact=False, dtype=dtype))


def test_compact_keeps_no_dense_masks():
    opt, params = run("id3", True)
    assert all(m is None for m in opt._masks)
    w = torch.nn.Parameter(torch.randn(100, 100))
    big = get_selective_optimizer(torch.optim.AdamW, "id3")(
        [w], lr=0.1, budget=40, max_steps=2, stream_grads=True)  # leafwise (small models: not)
    w.square().sum().backward()
    big.step()
    assert big.get_masks()[0].sum() == 20 and big._masks == [None]
    assert big.state_nbytes() < w.numel()  # not one byte per entry
    dense, _ = run("id3", False, compact=False)
    assert opt.state_dict()["selective"]["masks"][0].tolist() == \
        dense.state_dict()["selective"]["masks"][0].tolist()


def test_dense_gradients_are_freed_in_backward():
    params = make_params()
    opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
        groups(params), lr=0.01, stream_grads=True, **METHOD_KW["id3"])
    loss_fn(params, torch.randn(4, 7)).backward()
    assert all(p.grad is None for p in params[:5])
    assert params[5].grad is not None  # choose_all: stepped densely
    before = [p.detach().clone() for p in params]
    opt.step()
    assert sum(int((a != b).sum()) for a, b in zip(before, params)) > 0


def test_leaves_split_into_chunks_select_the_same(monkeypatch):
    whole = run("id3", True)
    monkeypatch.setattr(leafwise, "CHUNK", 5)  # every leaf in several chunks
    chunked = run("id3", True)
    assert chunked[0]._leafwise.chunk == 5
    assert_same(whole, chunked)
    assert_same(chunked, run("id3", False, compact=False))


@pytest.mark.parametrize("chunk", [1, 4, 64, 1 << 24])
def test_leafwise_selector_matches_numpy_top_k(chunk):
    rng = np.random.default_rng(0)
    shapes = [(40,), (3, 5), (1,), (17, 2)]
    grads = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    grads[0][3] = grads[0][5] = grads[3][0, 1]  # ties across chunks and leaves
    grads[2][0] = float("nan")  # never chosen
    params = [torch.ones(s) for s in shapes]
    masks = [torch.zeros(s, dtype=torch.bool) for s in shapes]
    masks[0][:4] = True  # already selected: excluded
    m = ID3(budget=24, max_steps=2)
    sel = LeafwiseSelector(m, [g.numel() for g in grads], chunk=chunk)
    before = [g.clone() for g in grads]
    for i in (3, 1, 0, 2):  # any order, as backward produces them
        sel.offer(i, grads[i], params[i], torch.nonzero(masks[i].reshape(-1)).view(-1))
    for g, b in zip(grads, before):  # excluded entries' gradients are put back
        assert torch.equal(g, b) or torch.equal(g.isnan(), b.isnan())
    got = sel.finish(11)
    scores = [np.where(mk.numpy(), -np.inf, np.abs(g.numpy()) / (1 + 1e-8))
              for g, mk in zip(grads, masks)]
    want = numpy_top_k(scores, 11)
    for i, w in enumerate(want):
        idx, vals = got.get(i, (torch.zeros(0, dtype=torch.int64), torch.zeros(0)))
        assert sorted(idx.tolist()) == np.flatnonzero(w.reshape(-1)).tolist()
        assert idx.dtype == torch.int64
        assert torch.equal(vals.float(), grads[i].reshape(-1)[idx])


def test_indices_past_int32_in_one_leaf():
    """A leaf with more than 2**31 entries cannot be allocated here; the index arithmetic it
    needs (the leaf's offset + the chunk's first entry + the index in the chunk, in int64) is
    what a small chunk runs too. This offers a chunk that starts at entry 2**31 of the leaf
    and checks that the result is int64 and not truncated at 2**31."""
    m = ID3(budget=4, max_steps=1)
    sel = LeafwiseSelector(m, [1, 4 * 2**30], chunk=2**30)
    g = torch.tensor([0.0, 0.0, 5.0, 1.0])
    sel._offer(1, g, torch.ones(4), first=2**31)  # entries 2**31 .. 2**31 + 3 of leaf 1
    idx, grads = sel.finish(2)[1]
    assert idx.dtype == torch.int64 and idx.tolist() == [2**31 + 2, 2**31 + 3]
    assert grads.tolist() == [5.0, 1.0]


def test_accumulation_refused_while_selecting_then_exact():
    params = make_params()
    _opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
        groups(params), lr=0.01, stream_grads=True, **METHOD_KW["id3"])
    loss_fn(params, torch.randn(4, 7)).backward()
    with pytest.raises(RuntimeError, match="still selects entries"):
        loss_fn(params, torch.randn(4, 7)).backward()
    # zero_grad discards what was streamed; after max_steps accumulation is exact
    for method in ("id3", "pafi"):
        kw = dict(METHOD_KW[method], **({"max_steps": 1} if method == "id3" else {}))
        results = []
        for stream in (True, False):
            ps = make_params()
            o = get_selective_optimizer(torch.optim.AdamW, method)(
                groups(ps), lr=0.01, stream_grads=stream, **kw)
            train(o, ps, steps=1)
            train(o, ps, steps=3, seed=2, accumulate=3)
            results.append((o, ps))
        assert_same(*results)


def test_zero_grad_discards_streamed_gradients():
    out = []
    for stream in (True, False):
        params = make_params()
        opt = get_selective_optimizer(torch.optim.AdamW, "pafi")(
            groups(params), lr=0.01, stream_grads=stream, **METHOD_KW["pafi"])
        loss_fn(params, torch.randn(4, 7) * 100).backward()
        opt.zero_grad()
        train(opt, params, steps=2)
        out.append((opt, params))
    assert_same(*out)


def test_lora_streaming_equals_compact():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    def model():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                       vocab_size=64, num_attention_heads=4, num_key_value_heads=2)
        m = transformers.LlamaForCausalLM(cfg)
        torch.manual_seed(1)
        return peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules="all-linear"))

    out = []
    for stream in (True, False):
        m = model()
        trainable = [p for p in m.parameters() if p.requires_grad]
        opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
            trainable, lr=0.01, budget=300, max_steps=2, stream_grads=stream)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
        for _ in range(3):
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        out.append((opt, trainable))
    assert out[0][0].get_budget_used() == 300
    assert_same(*out)


def test_streaming_refusals():
    params = make_params()
    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    with pytest.raises(ValueError, match="stream_grads=True needs the compact state"):
        cls(params, lr=0.1, compact=False, stream_grads=True, **METHOD_KW["id3"])
    with pytest.raises(TypeError, match="stream_grads must be True or False"):
        cls(params, lr=0.1, stream_grads=1, **METHOD_KW["id3"])
    with pytest.raises(ValueError, match="stream_grads=True needs the compact state"):
        get_selective_optimizer(torch.optim.Adam, "id3")(
            params, lr=0.1, weight_decay=0.1, stream_grads=True, **METHOD_KW["id3"])
    with pytest.raises(ValueError, match="stream_grads=True needs the compact state"):
        get_selective_optimizer(torch.optim.AdamW, "fft")(params, lr=0.1, stream_grads=True)


def test_leafwise_compiles_once_per_shape_and_stops_after_max_steps():
    opt, params = run("id3", True)  # 5 steps, max_steps 3: warms the compiled programs
    before = leafwise.TRACES[0]
    o, ps = run("id3", True)  # the same shapes again
    assert o._leafwise.offered == set()
    assert leafwise.TRACES[0] == before  # same shapes: nothing compiled again
    calls = []
    o._leafwise._offer = lambda *a: calls.append(a)
    train(o, ps, steps=2)  # after max_steps: no selection work at all
    assert calls == [] and o.count == 7


# -- clipping ----------------------------------------------------------------------------------
def clipped_run(method, stream, max_norm=0.5, dtype=torch.float32, choose_all=True):
    """Training with the gradients clipped to ``max_norm`` before every step: with streaming by
    the optimizer's ``clip_grad_norm_``, without it by torch's on the dense gradients."""
    params = make_params(dtype)
    cls = get_selective_optimizer(torch.optim.AdamW, method)
    opt = cls(groups(params, choose_all), lr=0.01, weight_decay=0.1, compact=True,
              stream_grads=stream, **METHOD_KW[method])
    g = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(5):
        opt.zero_grad()
        loss_fn(params, torch.randn(4, 7, generator=g).to(dtype)).backward()
        if stream:
            norms.append(opt.clip_grad_norm_(max_norm))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
        opt.step()
    return (opt, params), norms


@pytest.mark.parametrize("method", ["id3", "pafi", "fish"])
@pytest.mark.parametrize("choose_all", [True, False])
def test_clipping_under_streaming_equals_clipping_the_dense_gradients(method, choose_all):
    streamed, norms = clipped_run(method, True, choose_all=choose_all)
    dense, want = clipped_run(method, False, choose_all=choose_all)
    assert all(n > 0.5 for n in want)  # every step clips
    for a, b in zip(norms, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert_same(streamed, dense)
    unclipped = run(method, False, choose_all=choose_all)[1]
    assert not all(torch.equal(a, b) for a, b in zip(streamed[1], unclipped))


def test_clipping_under_streaming_bfloat16():
    streamed, norms = clipped_run("id3", True, dtype=torch.bfloat16)
    dense, want = clipped_run("id3", False, dtype=torch.bfloat16)
    assert [n.dtype for n in norms] == [torch.bfloat16] * 5
    assert all(torch.equal(a, b) for a, b in zip(norms, want))
    assert_same(streamed, dense)


def test_clipping_accumulated_streamed_gradients_is_refused():
    params = make_params()
    opt = get_selective_optimizer(torch.optim.AdamW, "pafi")(
        groups(params), lr=0.01, weight_decay=0.0, budget=40, stream_grads=True)
    x = torch.randn(4, 7)
    loss_fn(params, x).backward()
    loss_fn(params, x).backward()  # accumulation: only the selected entries' sum is kept
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] received several"):
        opt.clip_grad_norm_(1.0)
    with pytest.raises(ValueError, match="norm_type=1"):
        opt.clip_grad_norm_(1.0, norm_type=1)
