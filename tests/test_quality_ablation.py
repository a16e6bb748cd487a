"""EntryAdam (benchmarks/quality/ablation.py): per-entry Adam bias correction."""

import math

import pytest
import torch

from benchmarks.quality.ablation import EntryAdam, late_step_factor


def test_entry_adam_is_adam_when_every_entry_starts_at_step_one():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = EntryAdam([a], lr=0.01)
    opt_b = torch.optim.Adam([b], lr=0.01)
    for _ in range(6):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_late_entry_counts_its_own_steps():
    lr, g = 0.1, 0.5
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    ours, adam = EntryAdam([p], lr=lr, eps=1e-12), torch.optim.Adam([q], lr=lr, eps=1e-12)
    for t in range(1, 5):  # entry 0 has a gradient from step 1, entry 1 only at step 4
        grad = torch.tensor([1.0, g if t == 4 else 0.0])
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        adam.step()
        if t < 4:
            assert p[1].item() == 0.0 and q[1].item() == 0.0  # not started: never moved
    # its first own step: m_hat = g, v_hat = g^2, so the step is exactly lr
    assert p[1].item() == pytest.approx(-lr, rel=1e-4)
    # Adam with the global count t = 4: m_hat = 0.1 g / (1 - 0.9^4), v_hat = 0.001 g^2 / (1 - 0.999^4)
    hand = lr * (0.1 * g / (1 - 0.9**4)) / math.sqrt(0.001 * g * g / (1 - 0.999**4))
    assert q[1].item() == pytest.approx(-hand, rel=1e-4)
    assert hand == pytest.approx(lr * late_step_factor(4, 1), rel=1e-9)
    assert abs(hand - lr) > 0.1 * lr  # the two really differ
    assert p[0].item() == pytest.approx(q[0].item(), rel=1e-4)  # entry 0: plain Adam


def test_entry_adam_under_the_selective_wrapper_keeps_the_budget():
    from selective_optimizers.wrap import get_selective_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = get_selective_optimizer(EntryAdam, "id3")(
        params=model.parameters(), lr=0.05, budget=10, max_steps=5, eps=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    for _ in range(8):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    assert 0 < changed <= 10 and opt.get_budget_used() == 10
