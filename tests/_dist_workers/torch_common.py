"""Model, data and training loop shared by the torch distributed workers and their references.

Rank ``r`` of ``W`` trains on batch ``r``; the single-process reference averages the
gradients of the ``W`` batches, as DDP and FSDP do (for two ranks, ``(g0 + g1) / 2`` is
exact in floating point whatever the order of the reduction), so both runs see the same
gradients bit for bit and any difference comes from the selection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from optax_selective import methods
from optax_selective._tree import LeafLayout

STEPS = 5
LR = 0.1
ARGS = {  # each method's arguments here; the registry builds it
    "id3": dict(budget=100, max_steps=4),
    "pafi": dict(budget=20),
    "bitfit": dict(budget=12),
    "fish": dict(budget=20, fish_steps=2),
    "random": dict(budget=20, seed=3),
}
METHODS = {name: (lambda name=name: methods.get(name)(**ARGS[name])) for name in ARGS}


def make_model() -> torch.nn.Sequential:
    """Rows 9 and 5: uneven over two ranks (FSDP2 splits 5 rows as 3 + 2).

    Weights are multiples of 1/4, so magnitudes tie (PaFI's tie rule decides), and inputs
    3..5 are always zero (see :func:`batches`), so 27 entries have a zero ID3 score and the
    last ID3 steps choose among ties that span both ranks' shards.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 4) / 4)
    return model


def batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(world):
        x = torch.randn(4, 6, generator=g)
        x[:, 3:] = 0.0
        out.append((x, torch.randn(4, 5, generator=g)))
    return out


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.mean((model(x) - y) ** 2)


def layout_of(model: torch.nn.Module, choose_all: tuple[str, ...] = ("2.bias",)) -> LeafLayout:
    """Leaf order = ``model.named_parameters()``; the head's bias is choose_all."""
    names = [n for n, _ in model.named_parameters()]
    return LeafLayout(
        paths=tuple(names),
        shapes=tuple(tuple(p.shape) for _, p in model.named_parameters()),
        selectable=tuple(n not in choose_all for n in names),
        choose_all=tuple(n in choose_all for n in names),
    )


@torch.no_grad()
def sgd_on_masked(params, masks) -> None:
    """``p -= LR * g`` where the mask is true; the same rule in every run."""
    for p, m in zip(params, masks):
        g = torch.where(m, p.grad, torch.zeros((), dtype=p.grad.dtype))
        p.add_(g, alpha=-LR)


def train(model, runner, grads_of: Callable[[], None], on_step: Callable[[int, list], None]):
    """Init masks, then STEPS of: gradients, selection, masked SGD. Calls ``on_step(t, masks)``
    with the masks after init (t = 0) and after each step."""
    params = list(model.parameters())
    masks = runner.init(params)
    on_step(0, masks)
    for t in range(STEPS):
        grads_of()
        active = [i for i, ok in enumerate(runner.layout.selectable) if ok]
        new = runner.update(t, active, masks, [p.grad for p in params], params)
        masks = [new.get(i, m) for i, m in enumerate(masks)]
        sgd_on_masked(params, masks)
        on_step(t + 1, masks)
    return params, masks


def selective_adamw(params):
    """The bridge's selective AdamW used by the DDP run and its reference (weight decay on:
    the bridge must keep unselected entries fixed anyway)."""
    import torch_bridge

    cls = torch_bridge.get_selective_optimizer(torch.optim.AdamW, "id3")
    return cls(params, lr=0.05, weight_decay=0.1, budget=60, max_steps=4)


def mixed_placement_problem():
    """Whole params and per-step gradients for the Shard(0) / Replicate() runner check.

    Values are multiples of 1/4 so scores tie; returns ``(layout, params, grads_per_step)``.
    """
    g = torch.Generator().manual_seed(2)
    shapes = [(7, 3), (5,), (3, 4), (6,)]
    params = [torch.round(torch.randn(s, generator=g) * 4) / 4 for s in shapes]
    steps = [[torch.round(torch.randn(s, generator=g) * 2) / 2 for s in shapes] for _ in range(3)]
    names = tuple(f"p{i}" for i in range(len(shapes)))
    layout = LeafLayout(names, tuple(shapes), (True,) * len(shapes), (False,) * len(shapes))
    return layout, params, steps


MIXED_METHOD = lambda: methods.get("id3")(budget=24, max_steps=3)  # noqa: E731
