"""In-memory check that a selective optimizer kept its promise (``verify=True``).

Memory cost: one copy of every parameter the optimizer holds, kept in host (CPU) memory from
construction until the optimizer is freed: as many bytes as the parameters themselves (4 bytes
per float32 entry). Nothing is written to disk. The check is exact (bitwise, so ``-0.0`` vs
``0.0`` and NaN payloads count as changes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optax_selective.verify import VerificationError, changed_entries

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Host copies of ``params`` (the reference the later check compares against)."""
    return [p.detach().to("cpu", copy=True) for p in params]


def _host_view(t: torch.Tensor):
    """A NumPy view of ``t``'s storage with the same bits (bfloat16 and float8 included)."""
    t = t.detach().contiguous()
    if not (t.is_complex() or t.dtype == torch.bool):
        t = t.view(_BITS[t.element_size()])
    return t.numpy()


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Bool tensor: where ``after`` differs bitwise from ``before`` (same shape, on CPU).

    The rule is JAX's :func:`optax_selective.verify.changed_entries`, applied to the same
    bits, so both frameworks agree on what "unchanged" means.
    """
    after = after.detach().to("cpu")
    if before.shape != after.shape or before.dtype != after.dtype:
        raise VerificationError(
            f"parameter changed shape/dtype from {tuple(before.shape)}/{before.dtype} to "
            f"{tuple(after.shape)}/{after.dtype}"
        )
    return torch.from_numpy(changed_entries(_host_view(before), _host_view(after)))


def check(
    initial: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    budget: int | None,
    names: Sequence[str],
) -> None:
    """Raises :class:`VerificationError` if the budget is exceeded or an unselected entry moved.

    Example:
      >>> p = torch.zeros(3); m = torch.tensor([True, False, False])
      >>> init = snapshot([p]); p.data[0] = 1.0
      >>> check(init, [p], [m], budget=1, names=["p"])
    """
    problems = []
    used = sum(int(m.sum()) for m in masks)
    if budget is not None and used > budget:
        problems.append(f"{used} entries are selected, over the budget of {budget}")
    for name, b, p, m in zip(names, initial, params, masks):
        bad = int((changed(b, p) & ~m.to("cpu")).sum())
        if bad:
            problems.append(f"{name}: {bad} unselected entries changed")
    if problems:
        raise VerificationError("selective fine-tuning check failed:\n  " + "\n  ".join(problems))
