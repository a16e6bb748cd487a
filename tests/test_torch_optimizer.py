"""torch_bridge.optimizer: the 0.4 snippet verbatim, optimizers, closures, schedulers, bad
inputs, and state_dict()/load_state_dict() resuming exactly like an uninterrupted run."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import io
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import torch_bridge  # noqa: E402
from torch_bridge import VerificationError, get_selective_optimizer  # noqa: E402


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train(model, opt, steps, seed=1, closure=False):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=g)
        y = torch.randn(5, 3, generator=g)

        def loss_fn(x=x, y=y):
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss

        if closure:
            out = opt.step(loss_fn)
            assert torch.is_tensor(out)
        else:
            loss_fn()
            opt.step()


@pytest.fixture
def one_torch_thread():
    """torch's and JAX's CPU thread pools fight on small machines; this test runs 1000 steps."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.usefixtures("one_torch_thread")
def test_snippet_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.ReLU(), torch.nn.Linear(400, 2))
    head, body = list(model[2].parameters()), list(model[0].parameters())
    x, y = torch.randn(16, 300), torch.randint(0, 2, (16,))
    initial = [p.detach().clone() for p in model.parameters()]
    from torch_bridge import leafwise

    traces_before = leafwise.TRACES[0]
    # --- the snippet of the issue, unchanged ---
    from selective_optimizers.load_store import (
        load_summary_from_disk,
        load_weights_from_summary,
        write_summary_to_disk,
    )
    from selective_optimizers.wrap import get_selective_optimizer

    optimizer_class = get_selective_optimizer(torch.optim.AdamW, "id3")   # "id3" | "pafi" | "bitfit" | "fft"
    optimizer = optimizer_class(params=[{"params": head, "choose_all": True}, {"params": body}],
                                lr=1e-4, budget=100_000, exp=0, eps=1e-3, max_steps=1000)
    for _ in range(1000):  # ... usual loop: zero_grad(); loss.backward(); optimizer.step()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.post_train_work(); print("Budget used:", optimizer.get_budget_used())  # noqa: E702
    write_summary_to_disk("summary.pt", optimizer.get_summary(model))
    load_weights_from_summary(model, load_summary_from_disk("summary.pt"))
    # --- checks ---
    assert "Budget used: 100000" in capsys.readouterr().out
    # compiled once per chunk shape (weight, bias) and for the merge, not per step
    assert leafwise.TRACES[0] - traces_before <= 3
    fresh = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.ReLU(), torch.nn.Linear(400, 2))
    with torch.no_grad():
        for p, p0 in zip(fresh.parameters(), initial):
            p.copy_(p0)
    load_weights_from_summary(fresh, load_summary_from_disk("summary.pt"))
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert load_summary_from_disk("summary.pt")["budget_used"] == 100_000


OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "foreach": True}),
    (torch.optim.AdamW, {"lr": 0.01, "fused": True}),
    (torch.optim.Adagrad, {"lr": 0.1}),
    (torch.optim.RMSprop, {"lr": 0.01}),
]


@pytest.mark.parametrize("method", ["id3", "pafi", "bitfit", "fft"])
@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_optimizers_keep_budget_and_mask(method, opt_cls, kwargs):
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    cls = get_selective_optimizer(opt_cls, method)
    extra = {} if method == "fft" else {"budget": 35, "max_steps": 3}
    opt = cls([{"params": model[2].parameters(), "choose_all": True},
               {"params": model[0].parameters()}], verify=True, **kwargs, **extra)
    train(model, opt, 5)
    opt.post_train_work()
    used = opt.get_budget_used()
    total = sum(p.numel() for p in model.parameters())
    assert used == (total if method == "fft" else 35)  # bitfit: head 27 + body bias 8
    for p, b, m in zip(model.parameters(), before, [*opt.get_masks()[2:], *opt.get_masks()[:2]]):
        assert torch.equal(p[~m], b[~m])
    changed = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before))
    assert changed > 0


def test_closure_and_lbfgs():
    model = small_model()
    opt = get_selective_optimizer(torch.optim.SGD, "id3")(model.parameters(), lr=0.1, budget=10, max_steps=2)
    train(model, opt, 3, closure=True)
    assert opt.get_budget_used() == 10
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = get_selective_optimizer(torch.optim.LBFGS, "pafi")(model.parameters(), lr=0.5, budget=7, verify=True)
    train(model, opt, 2, closure=True)  # LBFGS evaluates the closure several times per step
    opt.post_train_work()
    assert sum(int((p != b).sum()) for p, b in zip(model.parameters(), before)) == 7


def test_lr_scheduler_sees_a_real_optimizer():
    model = small_model()
    opt = get_selective_optimizer(torch.optim.AdamW, "pafi")(model.parameters(), lr=0.1, budget=10)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            train(model, opt, 1)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert isinstance(opt, torch.optim.AdamW)


def test_no_grad_and_frozen_params_never_change():
    model = small_model()
    unused = torch.nn.Parameter(torch.randn(4, 4))
    frozen = torch.nn.Parameter(torch.randn(5), requires_grad=False)
    before = [unused.detach().clone(), frozen.detach().clone()]
    opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
        [*model.parameters(), unused, frozen], lr=0.1, budget=30, max_steps=3, weight_decay=0.1)
    train(model, opt, 5)  # `unused` never gets a gradient, `frozen` cannot
    masks = opt.get_masks()
    assert not masks[-1].any() and not masks[-2].any()
    assert torch.equal(unused, before[0]) and torch.equal(frozen, before[1])
    assert opt.get_budget_used() == 30
    # a gradient that appears on a param frozen at construction is dropped, not used
    frozen.grad = torch.ones(5)
    opt.step()
    assert torch.equal(frozen, before[1])


def test_no_recompilation_and_frozen_mask_skips_jax():
    model = small_model()
    opt = get_selective_optimizer(torch.optim.SGD, "id3")(model.parameters(), lr=0.1, budget=40, max_steps=4,
                                                         compact=False)  # the whole-model runner
    train(model, opt, 3)
    assert opt._runner.traces == 1
    model[2].weight.grad = None  # a different set of leaves takes part: one more trace, once
    opt.step()
    assert opt._runner.traces == 2
    train(model, opt, 3)  # mask frozen after max_steps: JAX is not called any more
    assert opt._runner.traces == 2 and opt.count == 7 and opt.get_budget_used() == 40


def test_verify_detects_tampering():
    model = small_model()
    opt = get_selective_optimizer(torch.optim.SGD, "pafi")(model.parameters(), lr=0.1, budget=5, verify=True)
    train(model, opt, 2)
    opt.post_train_work()
    m = opt.get_masks()[0]
    with torch.no_grad():
        model[0].weight[~m] += 1.0
    with pytest.raises(VerificationError, match="unselected entries changed"):
        opt.post_train_work()


def test_same_class_for_same_arguments():
    a = get_selective_optimizer(torch.optim.Adam, "id3")
    assert a is get_selective_optimizer(torch.optim.Adam, "ID3")
    assert issubclass(a, torch.optim.Adam) and a.__name__ == "SelectiveAdam"
    assert torch_bridge.get_selective_optimizer is get_selective_optimizer


BAD = [
    (dict(method="lora"), ValueError, "Unsupported PEFT method: 'lora'"),
    (dict(method="id3", budget=10), ValueError, "needs max_steps"),
    (dict(method="pafi"), ValueError, "needs budget"),
    (dict(method="id3", budget=10, max_steps=0), ValueError, r"max_steps must be in \[1, .*got 0"),
    (dict(method="pafi", budget=0), ValueError, r"budget must be in \[1, .*got 0"),
    (dict(method="pafi", budget=-3), ValueError, "got -3"),
    (dict(method="pafi", budget=2.5), TypeError, "budget must be an int, got 2.5"),
    (dict(method="pafi", budget=True), TypeError, "got True"),
    (dict(method="id3", budget=10, max_steps=2, exp=float("inf")), ValueError, "exp must be .*finite.*got inf"),
    (dict(method="id3", budget=10, max_steps=2, eps=-1e-3), ValueError, "eps must be >= 0, got -0.001"),
    (dict(method="id3", budget=27, max_steps=2, head=True), ValueError, "hold 27 entries but budget is 27"),
    (dict(method="pafi", budget=20, head=True), ValueError, "hold 27 entries but budget is 20"),
    (dict(method="pafi", budget=10_000), ValueError, "larger than the 83 eligible.*use the method 'fft'"),
    (dict(method="id3", budget=10_000, max_steps=3), ValueError, "larger than the 83 eligible"),
    (dict(method="pafi", budget=5, head="yes"), TypeError, r"\['choose_all'\] must be True or False, got 'yes'"),
    (dict(method="pafi", budget=5, verify="yes"), TypeError, "verify must be True or False"),
]


@pytest.mark.parametrize("case,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs(case, exc, match):
    case = dict(case)
    method, head = case.pop("method"), case.pop("head", None)
    model = small_model()
    groups = [{"params": model[0].parameters()}]
    if head is not None:
        groups.insert(0, {"params": model[2].parameters(), "choose_all": head})
    else:
        groups.append({"params": model[2].parameters()})
    with pytest.raises(exc, match=match):
        get_selective_optimizer(torch.optim.SGD, method)(groups, lr=0.1, **case)


def test_bad_classes_and_late_groups():
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        get_selective_optimizer(dict, "id3")
    with pytest.raises(TypeError, match="already a selective optimizer"):
        get_selective_optimizer(get_selective_optimizer(torch.optim.SGD, "fft"), "id3")
    opt = get_selective_optimizer(torch.optim.SGD, "fft")(small_model().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="fixes its parameters at construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    with pytest.raises(ValueError, match="no 'selective' entry"):
        opt.load_state_dict(torch.optim.SGD(small_model().parameters(), lr=0.1).state_dict())
    other = get_selective_optimizer(torch.optim.SGD, "pafi")(small_model().parameters(), lr=0.1, budget=3)
    with pytest.raises(ValueError, match="saved by method 'pafi', not 'fft'"):
        opt.load_state_dict(other.state_dict())


def test_eps_goes_to_inner_optimizer_except_for_id3():
    params = small_model().parameters()
    opt = get_selective_optimizer(torch.optim.Adam, "pafi")(params, lr=0.1, budget=3, eps=1e-3, max_steps=9)
    assert opt.param_groups[0]["eps"] == 1e-3  # as in 0.4; max_steps is ignored by pafi
    opt = get_selective_optimizer(torch.optim.Adam, "id3")(small_model().parameters(), lr=0.1,
                                                           budget=3, eps=1e-3, max_steps=2)
    assert opt.param_groups[0]["eps"] == 1e-8 and opt.method.eps == 1e-3


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler(fused):
    """GradScaler unscales first, or (fused) passes grad_scale/found_inf to step()."""
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
        model.parameters(), lr=0.05, fused=fused, budget=12, max_steps=3, verify=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 6, generator=g)).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    opt.post_train_work()
    assert opt.get_budget_used() == 12
    assert sum(int((p != b).sum()) for p, b in zip(model.parameters(), before)) == 12


@pytest.mark.side
def test_import_tells_jax_not_to_preallocate_and_leaves_dtensor_unloaded():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    # torch.distributed.tensor (half a second) is loaded only by whoever makes DTensors
    code = ("import os, sys, torch_bridge; assert 'jax' in sys.modules; "
            "assert 'torch.distributed.tensor' not in sys.modules; "
            "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "false"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"  # a user's own choice is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert out.stdout.strip() == "true"


def test_cpu_param_views_are_zero_copy():
    model = small_model()
    opt = get_selective_optimizer(torch.optim.SGD, "id3")(model.parameters(), lr=0.1, budget=8, max_steps=4,
                                                         compact=False)  # the whole-model runner
    train(model, opt, 2)
    views = opt._runner._param_views
    assert views and all(v.unsafe_buffer_pointer() == p.data_ptr() for p, _, v in views.values())


def test_cpu_grads_reach_jax_as_numpy_views_without_a_copy():
    model = small_model()
    opt = get_selective_optimizer(torch.optim.SGD, "id3")(model.parameters(), lr=0.1, budget=8, max_steps=4)
    runner = opt._runner
    g = torch.randn(4, 3)
    view = runner.step_view(g)
    assert isinstance(view, np.ndarray) and view.ctypes.data == g.data_ptr()
    strided = runner.step_view(g.t())  # made contiguous first, still the same values
    np.testing.assert_array_equal(strided, g.t().numpy())
    bf16 = runner.step_view(g.to(torch.bfloat16))  # NumPy cannot view bfloat16: DLPack
    assert isinstance(bf16, jax.Array) and bf16.dtype == jnp.bfloat16


# state_dict()/load_state_dict(): a resumed run continues exactly like an uninterrupted one.

def model_and_opt(method, state=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    if state is not None:
        model.load_state_dict(state)
    cls = get_selective_optimizer(torch.optim.AdamW, method)
    opt = cls([{"params": model[2].parameters(), "choose_all": True}, {"params": model[0].parameters()}],
              lr=0.05, weight_decay=0.1, budget=14 + 12, max_steps=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def steps(model, opt, sched, start, stop):
    for t in range(start, stop):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(3, 5, generator=g), torch.randn(3, 2, generator=g)
        opt.zero_grad()
        (model(x) - y).pow(2).sum().backward()
        opt.step()
        sched.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cut", [2, 4, 5])
@pytest.mark.parametrize("method", ["id3", "pafi"])
def test_resume_equals_uninterrupted(method, cut):
    model, opt, sched = model_and_opt(method)
    steps(model, opt, sched, 0, 7)
    model_a, opt_b0, sched_b0 = model_and_opt(method)
    steps(model_a, opt_b0, sched_b0, 0, cut)
    ckpt = roundtrip({"model": model_a.state_dict(), "opt": opt_b0.state_dict(),
                      "sched": sched_b0.state_dict()})
    model_b, opt_b, sched_b = model_and_opt(method, ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    assert opt_b.count == cut
    steps(model_b, opt_b, sched_b, cut, 7)
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.get_masks(), opt_b.get_masks()):
        assert torch.equal(a, b)
    assert opt_b.get_budget_used() == 26


def test_state_dict_is_compact_and_checked():
    model, opt, sched = model_and_opt("id3")
    steps(model, opt, sched, 0, 2)
    sd = opt.state_dict()
    sel = sd["selective"]
    assert sel["method"] == "id3" and sel["count"] == 2
    assert sel["masks"][:2] == ["full", "full"]
    assert sum(m.numel() for m in sel["masks"][2:]) == 6  # 12 // 4 entries per step, 2 steps
    bad = dict(sd, selective=dict(sel, masks=sel["masks"][:3]))
    with pytest.raises(ValueError, match="masks for 3 parameters, the optimizer has 4"):
        opt.load_state_dict(bad)
    wrong = dict(sd, selective=dict(sel, masks=[*sel["masks"][:2], torch.tensor([999]), sel["masks"][3]]))
    with pytest.raises(ValueError, match="out of range"):
        opt.load_state_dict(wrong)
    assert opt.count == 2  # a failed load leaves the optimizer as it was
