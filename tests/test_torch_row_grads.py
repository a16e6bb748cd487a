"""row_grads.chunk_weight_grads: the largest layers' weight gradients in row blocks, exactly."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torch_bridge import chunk_weight_grads, get_selective_optimizer, leafwise  # noqa: E402
from torch_bridge.row_grads import block_rows, set_row_sink  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Collect:
    """A sink that assembles the blocks it is given."""

    def __init__(self, weight):
        self.blocks = []
        self.grad = torch.zeros_like(weight)

    def takes_rows(self, rows):
        return True

    def take_rows(self, start, g):
        self.blocks.append((start, len(g)))
        self.grad[start:start + len(g)] = g


class LM(torch.nn.Module):
    """Embedding, a hidden layer and an LM head: the shapes of a language model, tiny."""

    def __init__(self, vocab=97, dim=12, hidden=10, bias=False, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim, padding_idx=0).to(dtype)
        self.body = torch.nn.Linear(dim, hidden).to(dtype)
        self.norm = torch.nn.Parameter(torch.ones(hidden, dtype=dtype))
        self.head = torch.nn.Linear(hidden, vocab, bias=bias).to(dtype)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)).tanh() * self.norm)


def lm_loss(model, ids):
    return F.cross_entropy(model(ids).float().reshape(-1, model.head.out_features),
                           ids.reshape(-1))


def tokens(n=1200, vocab=97, seed=1):
    # > 1000 tokens (embedding backward's parallel path), many repeats and padding tokens
    return torch.randint(0, vocab // 3, (2, n // 2), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """BLAS may split a product differently with another thread count: both must be exact."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_blocks_are_the_gradient_the_layer_gives_without_a_sink(dtype, bias, threads):
    ids = tokens()
    plain, alone, sunk = LM(bias=bias, dtype=dtype), LM(bias=bias, dtype=dtype), LM(bias=bias, dtype=dtype)
    for m in (alone, sunk):
        layers = chunk_weight_grads(m, min_numel=500, block=130)
        assert layers.names == ["embed", "head"]  # not body (120 entries)
    assert (block_rows(sunk.embed.weight), block_rows(sunk.head.weight)) == (10, 13)
    sinks = {m: Collect(getattr(sunk, m).weight) for m in ("embed", "head")}
    for m, sink in sinks.items():
        set_row_sink(getattr(sunk, m).weight, lambda s=sink: s)
    for m in (plain, alone, sunk):
        lm_loss(m, ids).backward()
    for m, sink in sinks.items():
        rows = block_rows(getattr(sunk, m).weight)
        assert getattr(sunk, m).weight.grad is None  # the whole gradient never existed
        assert sink.blocks == [(r, min(rows, 97 - r)) for r in range(0, 97, rows)]
        assert torch.equal(sink.grad, getattr(alone, m).weight.grad), m
    # the embedding's blocks are autograd's gradient bit for bit; the head's are autograd's
    # products over fewer rows (BLAS may round them differently in the last bit)
    assert torch.equal(sinks["embed"].grad, plain.embed.weight.grad)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(sinks["head"].grad, plain.head.weight.grad, rtol=tol, atol=tol)
    for (n, p), q in zip(plain.named_parameters(), alone.parameters()):
        if n not in ("embed.weight", "head.weight"):  # the other gradients are autograd's own
            assert torch.equal(p.grad, q.grad), n


def test_the_blocks_of_an_llm_head_in_bf16_equal_autograds_gradient_on_cpu():
    """At the LM shape the memory benchmark runs (bf16, 256 tokens), this CPU's BLAS gives
    the row blocks exactly the whole product's values."""
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 4000, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 256, 256, dtype=torch.bfloat16)
    dy = torch.randn(1, 256, 4000, dtype=torch.bfloat16)
    head(x).backward(dy)
    whole = head.weight.grad
    head.weight.grad = None
    chunk_weight_grads(head, min_numel=1, block=2**16)  # 256 rows per block
    head(x).backward(dy)
    assert torch.equal(head.weight.grad, whole)


def test_skips_tied_and_unsupported_layers_and_undoes():
    tied = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=False))
    tied[1].weight = tied[0].weight
    got = chunk_weight_grads(tied, min_numel=10)
    assert got.names == [] and set(got.skipped) == {"0", "1"}
    assert "tied" in got.skipped["0"]
    normed = torch.nn.Sequential(torch.nn.Embedding(50, 8, max_norm=1.0), torch.nn.Linear(8, 50))
    got = chunk_weight_grads(normed, min_numel=10)
    assert got.names == ["1"] and "max_norm" in got.skipped["0"]
    assert "forward" in normed[1].__dict__
    again = chunk_weight_grads(normed, min_numel=10)
    assert again.names == [] and "already" in again.skipped["1"]
    got.remove()
    assert "forward" not in normed[1].__dict__ and got.names == []
    with pytest.raises(ValueError, match="min_numel"):
        chunk_weight_grads(normed, min_numel=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        chunk_weight_grads([normed])


METHOD_KW = {
    "id3": {"budget": 150, "max_steps": 3},
    "pafi": {"budget": 150},
    "fish": {"budget": 150, "fish_steps": 2},
}


def train(method, *, stream, chunk, compact=True, dtype=torch.float32, steps=5, accumulate=1):
    model = LM(dtype=dtype)
    if chunk:
        layers = chunk_weight_grads(model, min_numel=500, block=300)  # 25 / 30 rows
        assert layers.names == ["embed", "head"]
    groups = [{"params": [model.embed.weight, model.body.weight, model.head.weight]},
              {"params": [model.body.bias], "choose_all": True},
              {"params": [model.norm], "lr": 0.05}]
    opt = get_selective_optimizer(torch.optim.AdamW, method)(
        groups, lr=0.01, weight_decay=0.1, compact=compact, stream_grads=stream,
        **METHOD_KW[method])
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            lm_loss(model, torch.randint(0, 97, (2, 40), generator=g)).backward()
        opt.step()
    return opt, model


def assert_same(a, b):
    (oa, ma), (ob, mb) = a, b
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)
    for x, y in zip(oa.get_masks(), ob.get_masks()):
        assert torch.equal(x, y)
    assert oa.get_budget_used() == ob.get_budget_used() > 0


@pytest.mark.parametrize("method", list(METHOD_KW))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_with_row_blocks_equals_every_other_form(method, dtype, monkeypatch):
    monkeypatch.setattr(leafwise, "CHUNK", 300)  # the body and the head: 2 and 4 chunks too
    blocks = []
    real = leafwise.LeafwiseSelector.offer_rows
    monkeypatch.setattr(leafwise.LeafwiseSelector, "offer_rows",
                        lambda self, i, start, g, *a: (blocks.append((i, start, len(g))),
                                                       real(self, i, start, g, *a))[1])
    chunked = train(method, stream=True, chunk=True, dtype=dtype)
    if method == "id3":  # it selected from row blocks: the embedding's and the head's
        assert {(i, s, n) for i, s, n in blocks if i == 0} == {(0, r, min(25, 97 - r))
                                                                for r in range(0, 97, 25)}
        assert any(i == 2 for i, _, _ in blocks)
    assert_same(chunked, train(method, stream=True, chunk=False, dtype=dtype))
    assert_same(chunked, train(method, stream=False, chunk=False, dtype=dtype))
    assert_same(chunked, train(method, stream=False, chunk=False, compact=False, dtype=dtype))


def test_accumulation_after_the_mask_is_fixed_adds_row_blocks(monkeypatch):
    monkeypatch.setattr(leafwise, "CHUNK", 300)
    # ID3's mask is fixed from step 3 on; 2 steps of 2 backward passes each after that
    def run(**kw):
        opt, model = train("id3", steps=3, **kw)
        g = torch.Generator().manual_seed(5)
        for _ in range(2):
            opt.zero_grad()
            for _ in range(2):
                lm_loss(model, torch.randint(0, 97, (2, 40), generator=g)).backward()
            opt.step()
        return opt, model
    assert_same(run(stream=True, chunk=True), run(stream=False, chunk=False))


def test_a_second_gradient_while_selecting_is_refused(monkeypatch):
    monkeypatch.setattr(leafwise, "CHUNK", 300)
    model = LM()
    chunk_weight_grads(model, min_numel=500, block=300)
    opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
        model.parameters(), lr=0.01, stream_grads=True, **METHOD_KW["id3"])
    ids = tokens(80)
    lm_loss(model, ids).backward()
    with pytest.raises(RuntimeError, match="a second gradient reached"):
        lm_loss(model, ids).backward()
    del opt
