"""CUDA tensors and parameters spread over several devices (CUDA cases skipped without CUDA).

Run on a GPU machine with a CUDA build of torch; with a CUDA build of jaxlib the selection is
zero-copy on the GPU, with a CPU-only jaxlib it goes through the host (a RuntimeWarning says so).
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from optax_selective import methods
from optax_selective._tree import LeafLayout

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import warnings  # noqa: E402

from torch_bridge import get_selective_optimizer  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(model, opt, device_in, steps=4):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(5, 6, generator=g).to(device_in)
        model(x).pow(2).sum().backward()
        opt.step()


@needs_cuda
@pytest.mark.parametrize("method", ["id3", "pafi", "bitfit"])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_params(method, fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).cuda()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CPU-only jaxlib: host copies
        opt = get_selective_optimizer(torch.optim.AdamW, method)(
            model.parameters(), lr=0.05, weight_decay=0.1, fused=fused, budget=9, max_steps=3,
            verify=True)
    run(model, opt, "cuda")
    opt.post_train_work()
    assert opt.get_budget_used() == 9
    assert all(m.device.type == "cuda" for m in opt.get_masks())
    for p, b, m in zip(model.parameters(), before, opt.get_masks()):
        assert torch.equal(p[~m], b[~m])


@needs_cuda
def test_params_on_cpu_and_cuda():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3).cuda()

    def model(x):
        return second(torch.tanh(first(x)).cuda())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt = get_selective_optimizer(torch.optim.SGD, "id3")(
            [*first.parameters(), *second.parameters()], lr=0.1, budget=12, max_steps=3,
            verify=True)
    run(model, opt, "cpu")
    opt.post_train_work()
    assert opt.get_budget_used() == 12
    assert [m.device.type for m in opt.get_masks()] == ["cpu", "cpu", "cuda", "cuda"]


@needs_cuda
def test_jax_does_not_preallocate_gpu_memory():
    import torch_bridge  # noqa: F401

    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    free_before, _ = torch.cuda.mem_get_info()
    torch.zeros(1, device="cuda")
    opt = get_selective_optimizer(torch.optim.SGD, "id3")(
        [torch.nn.Parameter(torch.randn(100, device="cuda"))], lr=0.1, budget=10, max_steps=2)
    assert opt is not None
    free_after, total = torch.cuda.mem_get_info()
    assert free_before - free_after < 0.2 * total


# A model split over CPU and CUDA (as ``device_map`` loads it): selection works per leaf.
#
# The CUDA case is skipped without CUDA (the CPU-only CI; the same check with both layers on
# the CPU always runs). With a GPU it checks that the bridge's selective
# AdamW steps a model whose first layer is on the CPU and second on the GPU, that every mask
# stays on its parameter's device, and that the chosen entries equal the shared JAX method run
# on host copies of the same gradients and parameters. torch refuses to concatenate tensors on
# different devices, so the step succeeding also shows that nothing is concatenated across them.

SECOND = [
    "cpu",  # the same check on one device: keeps the test itself honest on CPU-only CI
    pytest.param("cuda", marks=needs_cuda),
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
