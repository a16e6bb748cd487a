"""A model split over CPU and CUDA (as ``device_map`` loads it): selection works per leaf.

The CUDA case is skipped without CUDA (the CPU-only CI; the same check with both layers on
the CPU always runs). With a GPU it checks that the bridge's selective
AdamW steps a model whose first layer is on the CPU and second on the GPU, that every mask
stays on its parameter's device, and that the chosen entries equal the shared JAX method run
on host copies of the same gradients and parameters. torch refuses to concatenate tensors on
different devices, so the step succeeding also shows that nothing is concatenated across them.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from optax_selective import methods
from optax_selective._tree import LeafLayout

SECOND = [
    "cpu",  # the same check on one device: keeps the test itself honest on CPU-only CI
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]

BUDGET, MAX_STEPS = 30, 3


class Split(torch.nn.Module):
    def __init__(self, second: str):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(8, 16)
        self.second = torch.nn.Linear(16, 4).to(second)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)).to(self.second.weight.device))


def _host(t):
    return jnp.asarray(t.detach().cpu().numpy())


@pytest.mark.parametrize("second", SECOND)
def test_cpu_and_cuda_leaves_select_like_one_device(second):
    import torch_bridge

    model = Split(second)
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"cpu", second}
    cls = torch_bridge.get_selective_optimizer(torch.optim.AdamW, "id3")
    opt = cls(params, lr=1e-2, budget=BUDGET, max_steps=MAX_STEPS)
    method = methods.ID3(budget=BUDGET, max_steps=MAX_STEPS)
    layout = LeafLayout(
        tuple(n for n, _ in model.named_parameters()),
        tuple(tuple(p.shape) for p in params),
        (True,) * len(params),
        (False,) * len(params),
    )
    ref_masks, state = method.init([_host(p) for p in params], layout)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    for t in range(MAX_STEPS + 1):
        opt.zero_grad()
        model(x).square().mean().backward()
        grads, before = [p.grad.clone() for p in params], [p.detach().clone() for p in params]
        opt.step()
        ref_masks, state = method.update(
            ref_masks,
            state,
            jnp.int32(t),
            [_host(g) for g in grads],
            [_host(p) for p in before],
            [True] * len(params),
        )
        for p, m, want in zip(params, opt.get_masks(), ref_masks):
            assert m.device == p.device
            np.testing.assert_array_equal(m.cpu().numpy(), np.asarray(want))
    assert opt.get_budget_used() == BUDGET
