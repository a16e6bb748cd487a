"""CUDA tensors and parameters spread over several devices (skipped without CUDA).

Run on a GPU machine with a CUDA build of torch; with a CUDA build of jaxlib the selection is
zero-copy on the GPU, with a CPU-only jaxlib it goes through the host (a RuntimeWarning says so).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import warnings  # noqa: E402

from torch_bridge import get_selective_optimizer  # noqa: E402


def run(model, opt, device_in, steps=4):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(5, 6, generator=g).to(device_in)
        model(x).pow(2).sum().backward()
        opt.step()


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
