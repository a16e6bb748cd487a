"""state_dict()/load_state_dict(): a resumed run continues exactly like an uninterrupted one."""

import io
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_bridge import get_selective_optimizer  # noqa: E402


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
