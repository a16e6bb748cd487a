"""torch.compile and the bridge: summaries carry the plain model's names, and the shared
method's JAX update compiles once (not once for step 0 and again for step 1)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from torch_bridge import (  # noqa: E402
    get_selective_optimizer,
    load_weights_from_summary,
    make_summary,
)

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3))


def train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


# -- names -------------------------------------------------------------------------------------
def test_summary_of_a_compiled_model_has_the_plain_names_and_loads_onto_either():
    model = small_model()
    compiled = torch.compile(model, backend="eager")  # the wrapper's names start "_orig_mod."
    opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
        compiled.parameters(), lr=0.05, weight_decay=0.0, budget=20, max_steps=3)
    train(compiled, opt, 3)
    summary = opt.get_summary(compiled)
    plain_names = [n for n, _ in model.named_parameters()]
    assert set(summary["params"]) <= set(plain_names) and summary["params"]
    assert set(summary["buffers"]) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert opt.get_summary(model)["params"].keys() == summary["params"].keys()
    for target_of in (lambda m: m, lambda m: torch.compile(m, backend="eager")):
        fresh = small_model()
        load_weights_from_summary(target_of(fresh), summary)
        for a, b in zip(fresh.parameters(), model.parameters()):
            assert torch.equal(a, b)
        for a, b in zip(fresh.buffers(), model.buffers()):
            assert torch.equal(a, b)


def test_a_compiled_submodule_keeps_its_plain_name():
    model = small_model()
    model[3] = torch.compile(model[3], backend="eager")  # named "3._orig_mod.weight" by torch
    masks = [torch.ones_like(p, dtype=torch.bool) for p in model.parameters()]
    summary = make_summary(model, list(model.parameters()), masks, method="fft")
    assert list(summary["params"]) == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight",
                                       "3.bias"]
    plain = small_model(seed=1)
    load_weights_from_summary(plain, summary)
    assert torch.equal(plain[3].weight, model[3].weight)


# -- compile once ----------------------------------------------------------------------------------
@contextlib.contextmanager
def backend_compiles():
    """The XLA compilations (function names) that happen inside the block."""
    names = []

    def listen(event, secs, **kw):
        if event == BACKEND_COMPILE:
            names.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("method,kw", [
    ("id3", dict(max_steps=4, compact=False)),
    ("id3", dict(max_steps=4, compact=True)),
    ("fish", dict(fish_steps=3, compact=False)),
    ("id3", dict(max_steps=4, compact=True, stream_grads=True)),
])
def test_the_method_update_compiles_once(method, kw):
    model = small_model()
    opt = get_selective_optimizer(torch.optim.Adam, method)(model.parameters(), lr=0.01,
                                                            budget=20, **kw)
    with backend_compiles() as first:
        train(model, opt, 1)
    with backend_compiles() as later:
        train(model, opt, 3, seed=2)
    assert later == [], later  # step 0 and step 1 used to compile one each
    if kw.get("stream_grads"):  # ID3's leafwise selection: two programs per chunk size
        sizes = {p.numel() for p in model.parameters()}
        assert first.count("jit(_row_max)") == len(sizes) == first.count("jit(_row_scores)")
    else:
        assert len(first) == 1, first
        assert opt._runner.traces == 1


# -- a compiled optimizer step ----------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [
    ("id3", dict(max_steps=3, compact=False)),
    ("id3", dict(max_steps=3, compact=True)),
    ("pafi", dict(compact=True)),
])
def test_a_compiled_opt_step_selects_and_trains_as_the_eager_one(method, kw):
    """The LLM recipe ``@torch.compile def opt_step(): opt.step()`` (default backend): the
    step runs (its JAX selection used to crash dynamo in ``jax.dlpack.from_dlpack``) and
    selects and updates exactly as the eager step."""

    def run(compiled: bool):
        model = small_model()
        opt = get_selective_optimizer(torch.optim.AdamW, method)(
            model.parameters(), lr=0.05, weight_decay=0.1, budget=20, **kw)

        @torch.compile
        def opt_step():
            opt.step()

        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt_step() if compiled else opt.step()
        return opt.get_masks(), list(model.parameters()), opt.get_budget_used()

    eager_masks, eager_params, used = run(False)
    masks, params, compiled_used = run(True)
    assert compiled_used == used == 20
    for a, b in zip(masks, eager_masks):
        assert torch.equal(a, b)
    for a, b in zip(params, eager_params):
        assert torch.equal(a, b)
