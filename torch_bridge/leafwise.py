"""ID3's per-step global top-k, computed one parameter (one chunk of a parameter) at a time.

The compact state (:mod:`torch_bridge.compact`) needs only the entries a step adds, so the
step does not have to hand every leaf to one JAX program at once. :class:`LeafwiseSelector`
takes the leaves in any order (as ``backward`` produces their gradients, with
``stream_grads=True``): each leaf is cut into chunks of at most :data:`CHUNK` entries; each
chunk offers its own top-``k_max`` entries (``selection.shard_candidates`` with the method's
own elementwise ``score``, evaluated inside the selection pass, so no full score array is
written); the pending candidates are reduced with ``selection.merge_candidates`` (the merge
the FSDP2 runner uses) whenever they fill a fixed buffer, and :meth:`LeafwiseSelector.finish`
picks the step's ``k_t``. The global top-``k`` is always among the union of the chunks'
top-``k_max`` (ties go to the lower global index: chunks are numbered in leaf order and a
chunk's local order is the leaf's order restricted to it), so the entries are exactly those
the whole-model selection picks.

Memory: besides the gradient being read, one chunk's temporaries (at most a float32 score
row block of :data:`CHUNK` entries) and ``5 * k_max`` candidates. Indices are int64 per
leaf in torch; JAX sees int32 indices within a chunk only, so leaves with 2**31 entries or
more are handled (in chunks) too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
import torch

from optax_selective import selection

CHUNK = 1 << 24  # entries scored by one call: bounds the float32 temporaries (64 MiB)
_PENDING = 4  # the candidate buffer holds (1 + _PENDING) * k_max entries


@dataclasses.dataclass(frozen=True)
class _Unmasked:
    """``method.score(grad, param, False)``: excluded entries arrive with a NaN gradient
    instead of a mask, which the score maps to -inf exactly as the exclusion would (no mask
    needed). Holds the method (a frozen dataclass, equal by value), so equal methods share
    compiled programs."""

    method: Any

    def __call__(self, grad, param):
        return self.method.score(grad, param, False)


TRACES = [0]  # compilations of the two programs below, all selectors together (tests read it)


@partial(jax.jit, static_argnums=(0, 1))
def _chunk_candidates(score_fn: Callable, k: int, *xs):
    TRACES[0] += 1
    values, _, index, valid = selection.shard_candidates([xs], k, score_fn=score_fn)
    return values, index, valid


@partial(jax.jit, static_argnums=4)
def _merge(values, leaf, index, k, k_max):
    TRACES[0] += 1
    return selection.merge_candidates(values, leaf, index, k, k_max)


def _to_jax(t: torch.Tensor) -> jax.Array:
    return jax.dlpack.from_dlpack(t.detach())


class LeafwiseSelector:
    """Collects one step's candidates leaf by leaf and picks the global top-``k``.

    Args:
      method: a ``LeafwiseMethod`` (ID3): its elementwise ``score(grad, param, mask)`` is called
        with ``mask=False`` (excluded entries come with a NaN gradient), and ``k_max`` bounds
        the entries one step adds.
      numels: the number of entries of every leaf, in leaf order (fixes the chunk numbering).
      chunk: entries per scoring call (default :data:`CHUNK`, read at construction; tests
        lower it to exercise leaves split into chunks).

    Example:
      >>> from optax_selective.methods import ID3
      >>> m = ID3(budget=2, max_steps=1)
      >>> g, p = torch.tensor([0.1, 3.0, -2.0]), torch.ones(3)
      >>> sel = LeafwiseSelector(m, [3])
      >>> sel.offer(0, g, p)
      >>> leaf_idx = sel.finish(2)
      >>> leaf_idx[0][0].tolist(), leaf_idx[0][1].tolist()
      ([1, 2], [3.0, -2.0])
    """

    def __init__(self, method: Any, numels: Sequence[int], chunk: int | None = None):
        chunk = CHUNK if chunk is None else chunk
        if not 0 < chunk < 2**31:
            raise ValueError(f"chunk must be in [1, 2**31), got {chunk}.")
        self.score_fn = _Unmasked(method)
        self.k_max = int(method.k_max)
        self.chunk = int(chunk)
        counts = [-(-int(n) // self.chunk) for n in numels]
        self._first_chunk = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._first_chunk[-1] >= 2**31:
            raise ValueError("too many chunks for int32 chunk numbers; raise chunk.")
        self._cap = (1 + _PENDING) * self.k_max
        self.reset()

    def reset(self) -> None:
        """Forgets every candidate offered (a new step, or the user zeroed the gradients)."""
        self._values = torch.full((self._cap,), float("-inf"), dtype=torch.float32)
        self._sub = torch.zeros(self._cap, dtype=torch.int32)
        self._index = torch.zeros(self._cap, dtype=torch.int32)
        self._grads = torch.zeros(self._cap, dtype=torch.float64)
        self._n = 0
        self.offered: set[int] = set()

    def offer(self, leaf: int, grad: torch.Tensor, param: torch.Tensor,
              selected: torch.Tensor | None = None) -> None:
        """Adds leaf ``leaf``'s best ``k_max`` entries (per chunk) to the candidates, with the
        gradient values there (needed once the dense gradient is gone). ``selected`` (flat
        int64 indices) are excluded: their gradient is set to NaN during the call and put
        back after it. Reads the tensors during the call only."""
        if self.k_max == 0:
            return
        self.offered.add(leaf)
        flat_grad = grad.detach().reshape(-1)
        if selected is not None and selected.numel():
            if flat_grad.data_ptr() != grad.data_ptr() or not grad.is_contiguous():
                flat_grad = flat_grad.clone()  # a copy: nothing to put back
                selected_values = None
            else:
                selected_values = flat_grad[selected]
            flat_grad[selected] = float("nan")
            try:
                self._offer(leaf, flat_grad, param)
            finally:
                if selected_values is not None:
                    flat_grad[selected] = selected_values
            return
        self._offer(leaf, flat_grad, param)

    def _offer(self, leaf: int, flat_grad: torch.Tensor, param: torch.Tensor) -> None:
        flats = [flat_grad, param.detach().reshape(-1)]
        n = flats[0].numel()
        for j, start in enumerate(range(0, n, self.chunk)):
            end = min(n, start + self.chunk)
            xs = [_to_jax(f[start:end]) for f in flats]
            k = min(self.k_max, end - start)
            values, index, valid = jax.block_until_ready(_chunk_candidates(self.score_fn, k, *xs))
            valid = torch.from_dlpack(valid)
            index = torch.from_dlpack(index)[valid]
            values = torch.from_dlpack(values)[valid]
            if not index.numel():
                continue
            grads = flats[0][start:end][index.to(torch.int64)].to(torch.float64)
            sub = int(self._first_chunk[leaf]) + j
            self._push(values, torch.full_like(index, sub), index, grads)

    def _push(self, values, sub, index, grads) -> None:
        m = int(values.numel())
        if self._n + m > self._cap:
            self._reduce(self.k_max)
        s = slice(self._n, self._n + m)
        self._values[s], self._sub[s], self._index[s], self._grads[s] = values, sub, index, grads
        self._n += m

    def _reduce(self, k: int) -> None:
        """Keeps the best ``k`` candidates (the order merge_candidates decides)."""
        leaf, index, valid = jax.block_until_ready(_merge(
            _to_jax(self._values), _to_jax(self._sub), _to_jax(self._index), k, self.k_max))
        valid = torch.from_dlpack(valid)
        key_new = (torch.from_dlpack(leaf)[valid].to(torch.int64) << 32) | torch.from_dlpack(index)[valid].to(torch.int64)
        live = slice(0, self._n)
        key_old = (self._sub[live].to(torch.int64) << 32) | self._index[live].to(torch.int64)
        order = torch.argsort(key_old)
        pos = order[torch.searchsorted(key_old[order], key_new)]
        m = int(key_new.numel())
        vals, sub, idx, grads = (self._values[pos], self._sub[pos], self._index[pos], self._grads[pos])
        self._values.fill_(float("-inf"))
        self._values[:m], self._sub[:m], self._index[:m], self._grads[:m] = vals, sub, idx, grads
        self._n = m

    def finish(self, k: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The step's ``k`` entries: ``{leaf: (int64 flat indices, float64 gradient values)}``,
        in the order the method ranks them (best first); then forgets the candidates."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.k_max and self._n:
            self._reduce(k)
            sub = self._sub[: self._n].to(torch.int64)
            leaf = torch.from_numpy(
                np.searchsorted(self._first_chunk, sub.numpy(), side="right") - 1
            )
            flat = (sub - torch.from_numpy(self._first_chunk)[leaf]) * self.chunk + self._index[: self._n]
            grads = self._grads[: self._n]
            for i in torch.unique(leaf).tolist():
                sel = leaf == i
                out[int(i)] = (flat[sel], grads[sel].clone())
        self.reset()
        return out
