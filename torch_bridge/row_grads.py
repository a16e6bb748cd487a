"""Weight gradients of the largest layers, produced in row blocks while ``backward`` runs.

``stream_grads=True`` consumes each parameter's gradient as soon as autograd has accumulated
it, but autograd still builds that gradient whole first: for a Llama's LM head or token
embedding (32000 x 2048 at 1B) that is one full-size matrix, the largest tensor of the step.
:func:`chunk_weight_grads` makes the largest ``nn.Linear`` and ``nn.Embedding`` layers of a
model compute their weight gradient one block of rows at a time (a fixed number of rows per
layer, about 2**22 entries) and hand each block straight to the selective optimizer that
streams that weight, so the whole matrix never exists.

Exact: a layer computes its weight gradient in the same blocks whether an optimizer takes
them or not (without one it writes them into one whole gradient, which then flows through
autograd as usual), so streaming and non-streaming optimizers see the same values. The blocks
are what autograd computes for those rows, with the operation it uses
(``embedding_dense_backward`` for ``Embedding``, a matrix product for ``Linear``); for
``Embedding`` that is the whole gradient bit for bit, but a ``Linear``'s matrix product over
fewer rows may round differently in the last bit than the product over all rows (BLAS
libraries block their sums by the matrix shape), like any change of kernel.

Where no streaming optimizer takes a weight's rows (another optimizer, ``stream_grads=False``,
FISH while it scores dense gradients), the layer returns its whole gradient. Under autocast
the layers run as before (their own ``forward``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["RowSink", "ChunkedLayers", "block_rows", "chunk_weight_grads", "set_row_sink"]


class RowSink(Protocol):
    """What takes a weight's gradient rows (a streaming selective optimizer, per parameter)."""

    def takes_rows(self, rows: int) -> bool:
        """Whether it takes this backward's gradient in blocks of ``rows`` rows; if not, the
        layer gives autograd the whole gradient."""

    def take_rows(self, start: int, grad_rows: torch.Tensor) -> None:
        """Receives rows ``start:start + len(grad_rows)`` of the weight's gradient; the
        blocks of one backward come in order and cover every row."""


# weight -> its sink; weak on both sides: neither the weight nor the optimizer is kept alive
# (keyed by identity: tensors compare elementwise)
_SINKS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_ROWS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> rows per block


def set_row_sink(weight: torch.Tensor, sink: Callable[[], RowSink | None] | None) -> None:
    """Routes ``weight``'s gradient rows to ``sink()`` (a callable returning the sink, or None
    once it is gone, e.g. a ``weakref``); ``sink=None`` removes the route.

    Example:
      >>> w = torch.nn.Parameter(torch.ones(3, 2))
      >>> set_row_sink(w, None)  # nothing routed: the layer computes the whole gradient
    """
    if sink is None:
        _SINKS.pop(weight, None)
    else:
        _SINKS[weight] = sink


def block_rows(weight: torch.Tensor) -> int | None:
    """Rows per block of ``weight``'s gradient, for a weight of a layer changed by
    :func:`chunk_weight_grads`; None for any other tensor.

    Example:
      >>> layer = torch.nn.Linear(4, 10)
      >>> _ = chunk_weight_grads(layer, min_numel=1, block=8)
      >>> block_rows(layer.weight), block_rows(layer.bias)
      (2, None)
    """
    return _ROWS.get(weight)


def _sink_of(weight: torch.Tensor, rows: int) -> RowSink | None:
    ref = _SINKS.get(weight)
    sink = ref() if ref is not None else None
    return sink if sink is not None and sink.takes_rows(rows) else None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows):
        ctx.save_for_backward(x, weight)
        ctx.rows = rows
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        dy2 = dy.reshape(-1, dy.shape[-1])  # the products autograd's linear backward makes
        if ctx.needs_input_grad[0]:
            gx = dy.matmul(weight)
        if ctx.needs_input_grad[2]:
            gb = dy2.sum(0)
        if ctx.needs_input_grad[1]:
            x2, rows, n = x.reshape(-1, x.shape[-1]), ctx.rows, weight.shape[0]
            sink = _sink_of(weight, rows)
            if sink is None:
                gw = torch.empty(weight.shape, dtype=dy.dtype, device=dy.device)
            for r0 in range(0, n, rows):
                # Both paths make each block with the same call into a fresh tensor: BLAS
                # kernels may sum in another order for an output at another address or
                # alignment (seen with ``out=`` a slice of the whole gradient on AMD EPYC).
                block = dy2[:, r0:r0 + rows].t().mm(x2)
                if sink is None:  # the same blocks, copied into the whole gradient
                    gw[r0:r0 + rows].copy_(block)
                else:
                    sink.take_rows(r0, block)
        return gx, gw, gb, None


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, rows):
        ctx.save_for_backward(ids)
        ctx.weight = weight  # only to find its sink; the graph is freed after backward
        ctx.padding_idx, ctx.rows = padding_idx, rows
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        weight, rows = ctx.weight, ctx.rows
        n, pad = weight.shape[0], -1 if ctx.padding_idx is None else ctx.padding_idx
        sink = _sink_of(weight, rows)
        if sink is None:  # rows never mix in this gradient: the whole one equals the blocks
            return None, torch.ops.aten.embedding_dense_backward(dy, ids, n, pad, False), None, None
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            hit = (ids >= r0) & (ids < r1)  # the tokens of these rows, in their order
            sink.take_rows(r0, torch.ops.aten.embedding_dense_backward(
                dy[hit], ids[hit] - r0, r1 - r0, pad - r0 if r0 <= pad < r1 else -1, False))
        return None, None, None, None


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = _ROWS.get(self.weight)  # None: the weight was replaced after chunking
    if rows is None or not self.weight.requires_grad or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, self.weight, self.bias)
    return _Linear.apply(x, self.weight, self.bias, rows)


def _embedding_forward(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    rows = _ROWS.get(self.weight)
    if (rows is None or not self.weight.requires_grad
            or torch.is_autocast_enabled(self.weight.device.type)):
        return F.embedding(ids, self.weight, self.padding_idx)
    return _Embedding.apply(ids, self.weight, self.padding_idx, rows)


class ChunkedLayers:
    """The layers :func:`chunk_weight_grads` changed (``names``, and the modules themselves in
    ``modules``) and those it left as they were, with the reason (``skipped``:
    ``{name: why}``); :meth:`remove` undoes the change.

    Example:
      >>> m = torch.nn.Sequential(torch.nn.Embedding(50, 4), torch.nn.Linear(4, 50))
      >>> layers = chunk_weight_grads(m, min_numel=100)
      >>> layers.names
      ['0', '1']
      >>> layers.remove()
      >>> layers.names
      []
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        self.modules: list[torch.nn.Module] = []

    def remove(self) -> None:
        """Gives the layers their own ``forward`` back."""
        for m in self.modules:
            m.__dict__.pop("forward", None)
            _ROWS.pop(m.weight, None)
        self.modules, self.names = [], []

    def __repr__(self) -> str:
        return f"ChunkedLayers(names={self.names!r}, skipped={self.skipped!r})"


def _why_not(module: torch.nn.Module, shared: set[int]) -> str | None:
    if "forward" in module.__dict__:
        return "its forward is already replaced (chunked already, or by another library)"
    if id(module.weight) in shared:
        return ("its weight is shared with another layer (tied weights): its gradient adds "
                "up contributions autograd would accumulate")
    if isinstance(module, torch.nn.Embedding) and (
        module.max_norm is not None or module.scale_grad_by_freq or module.sparse
    ):
        return "max_norm, scale_grad_by_freq and sparse embeddings are not supported"
    return None


BLOCK = 1 << 22  # entries per block by default (rows of a layer: BLOCK // row length)


def chunk_weight_grads(model: torch.nn.Module, min_numel: int = 2**24,
                       block: int = BLOCK) -> ChunkedLayers:
    """Makes the ``nn.Linear`` and ``nn.Embedding`` layers of ``model`` with at least
    ``min_numel`` weight entries produce their weight gradient in row blocks for a selective
    optimizer built with ``stream_grads=True`` (see the module docstring).

    Use it for large language models, where the LM head and the token embedding are the
    largest gradients of a step: with ``stream_grads=True`` alone each of them still exists
    whole for a moment in ``backward``. Call it before building the optimizer (whose
    selection then cuts these weights into the same blocks). Weights shared by two layers
    (tied embeddings) and embeddings with ``max_norm``, ``scale_grad_by_freq`` or ``sparse``
    are left as they are (listed in ``skipped``).

    Args:
      model: the model; its layers are changed in place (:meth:`ChunkedLayers.remove` undoes).
      min_numel: the smallest weight (in entries) to chunk.
      block: entries per block (a layer's block is ``max(1, block // row_length)`` rows).

    Returns:
      A :class:`ChunkedLayers` naming the layers changed and those skipped.

    Example:
      >>> import torch, torch_bridge
      >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 100))
      >>> torch_bridge.chunk_weight_grads(model, min_numel=800).names
      ['0', '1']
      >>> opt = torch_bridge.get_selective_optimizer(torch.optim.AdamW, "id3")(
      ...     model.parameters(), lr=1e-3, weight_decay=0.0, budget=20, max_steps=2,
      ...     stream_grads=True)
      >>> ids = torch.tensor([[1, 5, 7]])
      >>> torch.nn.functional.cross_entropy(model(ids)[0], ids[0]).backward()
      >>> opt.step(); opt.get_budget_used()
      10
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    for name, v in (("min_numel", min_numel), ("block", block)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    shared = {k for k, v in seen.items() if v > 1}
    out = ChunkedLayers()
    for name, m in model.named_modules():
        if type(m) not in (torch.nn.Linear, torch.nn.Embedding) or m.weight.numel() < min_numel:
            continue
        why = _why_not(m, shared)
        if why is not None:
            out.skipped[name] = why
            continue
        forward: Any = _linear_forward if isinstance(m, torch.nn.Linear) else _embedding_forward
        m.forward = types.MethodType(forward, m)
        _ROWS[m.weight] = max(1, block // m.weight[0].numel())
        out.names.append(name)
        out.modules.append(m)
    return out
