"""Global top-k selection computed one parameter (one chunk of a parameter) at a time.

Used for ID3's per-step top-``k_t`` and for PaFI's fixed mask at construction
(:func:`choose_fixed_mask`). The compact state (:mod:`torch_bridge.compact`) needs only the
entries a step adds, so the step does not have to hand every leaf to one JAX program at once.
:class:`LeafwiseSelector` takes the leaves in any order (as ``backward`` produces their
gradients, with ``stream_grads=True``): each leaf is cut into equal chunks of at most
:data:`CHUNK` entries; each chunk offers its own top-``k_max`` entries
(``selection.shard_candidates`` with the method's own elementwise ``score``, evaluated inside
the selection pass, so no full score array is written); the pending candidates are reduced
with ``selection.merge_candidates`` (the merge the FSDP2 runner uses) whenever they fill a
fixed buffer, and :meth:`LeafwiseSelector.finish` picks the step's ``k``. The global top-``k``
is always among the union of the chunks' top-``k_max`` (ties go to the lower global index:
chunks are numbered in leaf order and a chunk's local order is the leaf's order restricted to
it), so the entries are exactly those the whole-model selection picks.

Memory: besides the tensors being read, one chunk's temporaries and ``5 * k_max``
candidates; one compiled program per distinct chunk size (each holds about 10 MiB while the
process lives, so a leaf's chunks are equal and the heap is trimmed after compiling). Indices
are int64 per leaf in torch; JAX sees int32 indices within a chunk only, so leaves with 2**31
entries or more are handled (in chunks) too.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
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


@dataclasses.dataclass(frozen=True)
class _InitScore:
    """``method.score(param)``: a fixed mask's score (PaFI), one input per entry."""

    method: Any

    def __call__(self, param):
        return self.method.score(param)


TRACES = [0]  # compilations of the two programs below, all selectors together (tests read it)
TRIMS = [0]  # heap trims after those compilations (tests read it)


def _glibc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None


_MALLOC_TRIM = _glibc_trim()


def trim_heap() -> None:
    """Hands the memory a compilation freed back to the system. XLA's compiler frees most of
    what it allocates, but glibc keeps freed small blocks in its heaps (one per thread), so
    the process stays larger by about 10 MiB after the first programs; a compilation happens
    while backward runs, so that memory would add to every later step's peak."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
        TRIMS[0] += 1


@partial(jax.jit, static_argnums=(0, 1))
def _chunk_candidates(score_fn: Callable, k: int, *xs):
    TRACES[0] += 1
    values, _, index, valid = selection.shard_candidates([xs], k, score_fn=score_fn)
    return values, index, valid


@partial(jax.jit, static_argnums=4)
def _merge(values, leaf, index, k, k_max):
    TRACES[0] += 1
    return selection.merge_candidates(values, leaf, index, k, k_max)


@partial(jax.jit, static_argnums=0)
def _increment(method, count, effective_budget):
    TRACES[0] += 1
    return method.increment(count, effective_budget)


def step_size(method: Any, count: int, effective_budget: int) -> int:
    """``method.increment(count, effective_budget)`` (ID3's ``k_t``) as an int: one compiled
    program, where calling it eagerly would compile one per JAX operation in it."""
    traces = TRACES[0]
    k = int(_increment(method, np.int32(count), np.int32(effective_budget)))
    if TRACES[0] != traces:
        trim_heap()
    return k


def _to_jax(t: torch.Tensor) -> jax.Array:
    return jax.dlpack.from_dlpack(t.detach())


class LeafwiseSelector:
    """Collects one step's candidates leaf by leaf and picks the global top-``k``.

    Args:
      method: a ``LeafwiseMethod`` (ID3): its elementwise ``score(grad, param, mask)`` is called
        with ``mask=False`` (excluded entries come with a NaN gradient), and ``k_max`` bounds
        the entries one step adds.
      numels: the number of entries of every leaf, in leaf order (fixes the chunk numbering).
      chunk: the most entries per scoring call (default :data:`CHUNK`, read at construction;
        tests lower it to exercise leaves split into chunks). A leaf of ``n`` entries is cut
        into ``ceil(n / chunk)`` chunks of ``ceil(n / ceil(n / chunk))`` entries (the last
        may be shorter).
      k_max: given, the selector chooses a fixed mask of ``k_max`` entries from
        ``method.score(param)`` (:meth:`offer_param`) instead.
      row_chunks: ``{leaf: (row_length, rows)}``: those leaves are cut into chunks of
        ``rows`` whole rows of ``row_length`` entries instead (``chunk`` aside), so that each
        block of rows a layer of :func:`torch_bridge.chunk_weight_grads` produces is one
        chunk, offered alone (:meth:`offer_rows`) before the rest of the gradient exists.

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

    def __init__(self, method: Any, numels: Sequence[int], chunk: int | None = None, *,
                 k_max: int | None = None, row_chunks: dict[int, tuple[int, int]] | None = None):
        chunk = CHUNK if chunk is None else chunk
        if not 0 < chunk < 2**31:
            raise ValueError(f"chunk must be in [1, 2**31), got {chunk}.")
        # k_max given: a mask chosen once from the parameters (PaFI's init, k = k_max), with
        # the method's score(param); no gradient values are kept.
        self._init = k_max is not None
        self.score_fn = _InitScore(method) if self._init else _Unmasked(method)
        self.k_max = int(method.k_max if k_max is None else k_max)
        self.chunk = int(chunk)
        counts = [max(1, -(-int(n) // self.chunk)) for n in numels]
        # a leaf's chunks are equal (but the last): fewer distinct shapes to compile (the
        # 32000-row embedding and LM head: one program, not two), each kept in memory
        sizes = [-(-int(n) // c) for n, c in zip(numels, counts)]
        self._row_chunks = dict(row_chunks or {})
        for i, (row_len, rows) in self._row_chunks.items():  # a block of rows is one chunk
            sizes[i] = int(row_len) * int(rows)
        self._size = np.array(sizes, np.int64)
        counts = [max(1, -(-int(n) // int(z))) for n, z in zip(numels, sizes)]
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
        self._grads = None if self._init else torch.zeros(self._cap, dtype=torch.float64)
        self._n = 0
        # the k_max-th best value kept so far: an entry scoring below it cannot be among the
        # best k_max (ties can, by their index), so it is not even pushed
        self._floor = float("-inf")
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

    def rows_per_chunk(self, leaf: int) -> int | None:
        """Rows of leaf ``leaf`` per chunk (for :meth:`offer_rows`), or None for a leaf not
        given in ``row_chunks``."""
        return int(self._row_chunks[leaf][1]) if leaf in self._row_chunks else None

    def offer_rows(self, leaf: int, start: int, grad_rows: torch.Tensor, param: torch.Tensor,
                   selected: torch.Tensor | None = None) -> None:
        """:meth:`offer` for one chunk of leaf ``leaf`` only: the gradient of its rows
        ``start:start + rows_per_chunk(leaf)`` (fewer at the end of the leaf), given before
        the rest of the leaf's gradient exists. ``param`` is the whole parameter and
        ``selected`` the leaf's selected entries (flat, int64) as for :meth:`offer`."""
        if self.k_max == 0:
            return
        rows = self.rows_per_chunk(leaf)
        if rows is None or start % rows:
            raise ValueError(f"rows from {start} are not a chunk of leaf {leaf} "
                             f"({rows} rows per chunk).")
        self.offered.add(leaf)
        lo = start * int(self._row_chunks[leaf][0])
        flat_grad = grad_rows.detach().reshape(-1)
        if selected is not None and selected.numel():
            here = selected[(selected >= lo) & (selected < lo + flat_grad.numel())] - lo
            flat_grad[here] = float("nan")  # the block is consumed: nothing to put back
        flat_param = param.detach().reshape(-1)[lo:lo + flat_grad.numel()]
        self._offer(leaf, flat_grad, flat_param, first=start // rows)

    def offer_param(self, leaf: int, param: torch.Tensor) -> None:
        """Adds leaf ``leaf``'s best ``k_max`` entries (per chunk) by ``method.score(param)``
        (a selector built with ``k_max``: a mask chosen from the parameters alone)."""
        if not self._init:
            raise TypeError("offer_param needs a selector built with k_max (a fixed mask).")
        if self.k_max:
            self.offered.add(leaf)
            self._offer(leaf, None, param)

    def _offer(self, leaf: int, flat_grad: torch.Tensor | None, param: torch.Tensor,
               first: int = 0) -> None:
        """Offers chunks ``first, first + 1, ...`` of leaf ``leaf`` (the tensors hold those)."""
        flats = [param.detach().reshape(-1)]
        if flat_grad is not None:
            flats.insert(0, flat_grad)
        n = flats[0].numel()
        size = int(self._size[leaf])
        traces = TRACES[0]
        for j, start in enumerate(range(0, n, size)):
            end = min(n, start + size)
            xs = [_to_jax(f[start:end]) for f in flats]
            k = min(self.k_max, end - start)
            values, index, valid = jax.block_until_ready(_chunk_candidates(self.score_fn, k, *xs))
            valid = torch.from_dlpack(valid)
            if self._floor > float("-inf"):
                valid = valid & (torch.from_dlpack(values) >= self._floor)
            index = torch.from_dlpack(index)[valid]
            values = torch.from_dlpack(values)[valid]
            if not index.numel():
                continue
            grads = None if flat_grad is None else (
                flat_grad[start:end][index.to(torch.int64)].to(torch.float64))
            sub = int(self._first_chunk[leaf]) + first + j
            self._push(values, torch.full_like(index, sub), index, grads)
        if TRACES[0] != traces:
            trim_heap()

    def _push(self, values, sub, index, grads) -> None:
        m = int(values.numel())
        if self._n + m > self._cap:
            self._reduce(self.k_max)
        s = slice(self._n, self._n + m)
        self._values[s], self._sub[s], self._index[s] = values, sub, index
        if self._grads is not None:
            self._grads[s] = grads
        self._n += m

    def _reduce(self, k: int) -> None:
        """Keeps the best ``k`` candidates (the order merge_candidates decides)."""
        traces = TRACES[0]
        leaf, index, valid = jax.block_until_ready(_merge(
            _to_jax(self._values), _to_jax(self._sub), _to_jax(self._index), k, self.k_max))
        valid = torch.from_dlpack(valid)
        leaf, index = torch.from_dlpack(leaf)[valid], torch.from_dlpack(index)[valid]
        m = int(leaf.numel())
        if self._grads is None:
            # nothing rides along: the kept values are the m largest, best first as the slots
            vals, sub, idx = torch.topk(self._values[: self._n], m).values, leaf, index
        else:  # find each kept candidate's gradient value
            key_new = (leaf.to(torch.int64) << 32) | index.to(torch.int64)
            live = slice(0, self._n)
            key_old = (self._sub[live].to(torch.int64) << 32) | self._index[live].to(torch.int64)
            order = torch.argsort(key_old)
            pos = order[torch.searchsorted(key_old[order], key_new)]
            vals, sub, idx = self._values[pos], self._sub[pos], self._index[pos]
            self._grads[:m] = self._grads[pos]
        self._values.fill_(float("-inf"))
        self._values[:m], self._sub[:m], self._index[:m] = vals, sub, idx
        self._n = m
        if m == k == self.k_max:
            self._floor = float(vals.min())
        if TRACES[0] != traces:
            trim_heap()

    def finish(self, k: int) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """The step's ``k`` entries: ``{leaf: (int64 flat indices, float64 gradient values)}``,
        in the order the method ranks them (best first); then forgets the candidates. The
        gradient values are None for a selector built with ``k_max``."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.k_max and self._n:
            self._reduce(k)
            sub = self._sub[: self._n].to(torch.int64)
            leaf = torch.from_numpy(
                np.searchsorted(self._first_chunk, sub.numpy(), side="right") - 1
            )
            flat = ((sub - torch.from_numpy(self._first_chunk)[leaf]) * torch.from_numpy(self._size)[leaf]
                    + self._index[: self._n])
            grads = None if self._grads is None else self._grads[: self._n]
            for i in torch.unique(leaf).tolist():
                sel = leaf == i
                out[int(i)] = (flat[sel], None if grads is None else grads[sel].clone())
        self.reset()
        return out


INIT_CHUNK = 1 << 22  # entries per call of a fixed mask's passes: 16 MiB of int32 digits
_DIGITS = 1 << 16
_BIN_CAP = 1 << 20  # the most entries kept from the threshold's histogram bin (else 2 more passes)


@partial(jax.jit, static_argnums=0)
def _high_digits(score_fn: Callable, x):
    """The top 16 bits of ``order_key(score)`` (0: non-finite), as int32."""
    TRACES[0] += 1
    return (selection.order_key(score_fn(x)) >> 16).astype(jnp.int32)


@partial(jax.jit, static_argnums=0)
def _low_digits(score_fn: Callable, x, high):
    """The low 16 bits of ``order_key(score)`` where its top 16 bits are ``high``, else
    ``2**16`` (a bin of its own), as int32."""
    TRACES[0] += 1
    key = selection.order_key(score_fn(x))
    return jnp.where((key >> 16) == high, (key & jnp.uint32(0xFFFF)).astype(jnp.int32), _DIGITS)


@partial(jax.jit, static_argnums=0)
def _against(score_fn: Callable, x, threshold):
    """Per entry: 2 where ``order_key(score) > threshold``, 1 where equal, else 0 (int8)."""
    TRACES[0] += 1
    key = selection.order_key(score_fn(x))
    return (key > threshold).astype(jnp.int8) * 2 + (key == threshold).astype(jnp.int8)


@partial(jax.jit, static_argnums=0)
def _against_high(score_fn: Callable, x, high):
    """Per entry (int32): ``2**16`` where the top 16 bits of ``order_key(score)`` exceed
    ``high``, the low 16 bits where they equal it, else -1."""
    TRACES[0] += 1
    key = selection.order_key(score_fn(x))
    top = key >> 16
    low = (key & jnp.uint32(0xFFFF)).astype(jnp.int32)
    return jnp.where(top > high, _DIGITS, jnp.where(top == high, low, -1))


def _digit_at_rank(hist: torch.Tensor, need: int) -> tuple[int, int]:
    """The largest digit ``d`` with ``count(digit >= d) >= need`` and ``count(digit > d)``."""
    at_or_above = torch.flip(torch.cumsum(torch.flip(hist, (0,)), 0), (0,))
    d = max(0, int((at_or_above >= need).sum()) - 1)
    above = int(at_or_above[d + 1]) if d + 1 < hist.numel() else 0
    return d, above


def choose_fixed_mask(method: Any, params: Sequence[torch.Tensor], selectable: Sequence[bool],
                      k: int, chunk: int | None = None) -> dict[int, torch.Tensor]:
    """A fixed mask chosen from the parameters (PaFI's init) one parameter (chunk) at a time:
    the ``k`` highest ``method.score(param)`` over the ``selectable`` leaves, ties to the lower
    global index, non-finite scores never, exactly as the whole-model ``method.init``. Returns
    ``{leaf: sorted int64 flat indices}`` (leaves with none left out).

    The selection is ``selection``'s radix path, one chunk at a time: a histogram
    (``torch.bincount``) of the top 16 bits of the order-preserving ``selection.order_key`` of
    the scores (computed by the method's JAX ``score``) finds the bin of the k-th highest; a
    second pass takes every entry above that bin and keeps those in it (few, at most
    :data:`_BIN_CAP`) with their low 16 bits, of which the best join (ties to the lower index).
    A crowded bin (many ties) takes a histogram of the low 16 bits and a third pass instead.
    Nothing is sorted but the bin: besides the indices returned, memory is one chunk's int32
    digits (``chunk`` entries, default :data:`INIT_CHUNK`).

    Example:
      >>> from optax_selective.methods import PaFI
      >>> ps = [torch.tensor([0.5, -0.1, 2.0]), torch.tensor([0.0, 0.1])]
      >>> {i: v.tolist() for i, v in choose_fixed_mask(PaFI(budget=3), ps, [True, True], 3).items()}
      {0: [1], 1: [0, 1]}
    """
    chunk = INIT_CHUNK if chunk is None else int(chunk)
    if not 0 < chunk < 2**31:
        raise ValueError(f"chunk must be in [1, 2**31), got {chunk}.")
    score_fn = _InitScore(method)
    leaves = [(i, p.detach().reshape(-1)) for i, (p, ok) in enumerate(zip(params, selectable))
              if ok and p.numel()]
    traces = TRACES[0]

    def pieces():  # (leaf, start, piece as a JAX array): a leaf's pieces are equal but the last
        for i, flat in leaves:
            n = flat.numel()
            size = -(-n // max(1, -(-n // chunk)))
            for start in range(0, n, size):
                yield i, start, _to_jax(flat[start:start + size])

    def count(digits):
        return torch.bincount(torch.from_dlpack(digits), minlength=_DIGITS + 1)[: _DIGITS + 1]

    hist = torch.zeros(_DIGITS + 1, dtype=torch.int64)
    for _, _, x in pieces():
        hist += count(_high_digits(score_fn, x))
    hist[0] = 0  # bin 0 holds only key 0: non-finite scores (finite keys start at 0x0080....)
    kk = min(int(k), int(hist.sum()))
    out: dict[int, torch.Tensor] = {}
    if kk <= 0:
        return out
    high, above_high = _digit_at_rank(hist[:_DIGITS], kk)
    found: dict[int, list[torch.Tensor]] = {}
    if int(hist[high]) <= _BIN_CAP:
        # One more pass: the entries above the threshold's bin are chosen; those in it (few:
        # at most _BIN_CAP) are kept with their low 16 bits, and the best kk - above_high of
        # them (ties to the lower global index) join.
        in_bin: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, start, x in pieces():
            v = torch.from_dlpack(_against_high(score_fn, x, np.uint32(high)))
            idx = torch.nonzero(v >= 0).view(-1)
            vals = v[idx]
            above = vals == _DIGITS
            if bool(above.any()):
                found.setdefault(i, []).append(idx[above] + start)
            if not bool(above.all()):
                inside = ~above
                in_bin.append((i, idx[inside] + start, vals[inside]))
        need = kk - above_high
        if need and in_bin:
            lows = torch.cat([v for _, _, v in in_bin])  # in global order
            best = torch.sort(torch.argsort(lows, descending=True, stable=True)[:need]).values
            pos = 0
            for i, idx, _ in in_bin:
                mine = best[(best >= pos) & (best < pos + idx.numel())] - pos
                if mine.numel():
                    found.setdefault(i, []).append(idx[mine])
                pos += idx.numel()
    else:  # a crowded bin (many ties): a second histogram finds the exact threshold
        hist.zero_()
        for _, _, x in pieces():
            hist += count(_low_digits(score_fn, x, np.uint32(high)))
        low, above_low = _digit_at_rank(hist[:_DIGITS], kk - above_high)
        threshold = np.uint32((high << 16) | low)
        ties = kk - above_high - above_low  # ties with the threshold still to take, in leaf order
        for i, start, x in pieces():
            code = torch.from_dlpack(_against(score_fn, x, threshold))
            if ties > 0:
                tied = torch.nonzero(code == 1).view(-1)
                if tied.numel() > ties:
                    code = code.clone()
                    code[tied[ties:]] = 0
                ties -= min(ties, int(tied.numel()))
                idx = torch.nonzero(code).view(-1)
            else:
                idx = torch.nonzero(code == 2).view(-1)
            if idx.numel():
                found.setdefault(i, []).append(idx + start)
    if TRACES[0] != traces:
        trim_heap()
    return {i: torch.sort(torch.cat(found[i])).values for i in sorted(found)}
