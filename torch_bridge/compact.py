"""Compact inner state for torch optimizers: the inner optimizer sees the selected entries only.

With ``compact=True`` a selective optimizer does not run its inner ``torch.optim`` step over
whole parameters. The selected entries of the parameters of one param group that share a
dtype and device live in one flat *slot buffer* of fixed capacity; each step copies their
values and gradients into the buffer, runs the inner step on the buffers (plus the
``choose_all`` parameters, which stay dense), and copies the values back. The inner
optimizer's state (Adam moments, momentum buffers, ...) therefore holds ``capacity`` entries
per buffer instead of one per parameter entry, and the slots' indices are the record of what
is selected (the optimizer keeps no dense masks once the method needs none; see
``CompactState.mask_of``): optimizer memory is O(budget).

Capacity is fixed at construction (the budget left after ``choose_all``, capped by the
group's selectable entries) so ID3's growing selection never reallocates. Unfilled slots hold
value 0 with gradient 0, so their state evolves exactly like that of an entry whose gradient
has always been zero; an entry that takes a slot later starts from that state, which is what
the dense form gives an entry unselected until then (its gradient was masked to zero).

Exactness: the same parameters as the dense form (``compact=False``) for the elementwise
optimizers of :data:`ELEMENTWISE` without *coupled* weight decay (``AdamW`` and
``decoupled_weight_decay=True`` are fine), provided every selectable parameter gets a gradient
in every step. Coupled weight decay is refused: in the dense form it feeds ``wd * θ`` of
unselected entries into their optimizer state, history the compact form does not keep. A
parameter without a gradient in some step keeps its selected values and their slot state for
that step, but its group's step count (Adam's bias correction) still advances.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from torch_bridge.safety import nonzero  # "is this hyper-parameter set?", also for tensors

ELEMENTWISE: tuple[type, ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


def compact_refusal(optimizer_class: type, param_groups: Sequence[dict[str, Any]]) -> str | None:
    """Why ``compact=True`` cannot reproduce the dense form for this optimizer, or None.

    Example:
      >>> compact_refusal(torch.optim.AdamW, [{"weight_decay": 0.01}]) is None
      True
      >>> compact_refusal(torch.optim.LBFGS, [{}])[:40]
      'compact=True needs an elementwise optimi'
    """
    if optimizer_class not in ELEMENTWISE:
        names = ", ".join(c.__name__ for c in ELEMENTWISE)
        return (
            f"compact=True needs an elementwise optimizer whose update of an entry depends on "
            f"that entry only ({names}); {optimizer_class.__name__} is not one of them. Use "
            "compact=False."
        )
    if optimizer_class is torch.optim.AdamW:
        return None
    for gi, group in enumerate(param_groups):
        decoupled = group.get("decoupled_weight_decay", False)
        if nonzero(group.get("weight_decay", 0.0)) and not decoupled:
            return (
                f"compact=True with coupled weight decay (param_groups[{gi}] of "
                f"{optimizer_class.__name__} has weight_decay={group['weight_decay']}) is not "
                "exact: the dense form lets the decay of unselected entries build up their "
                "optimizer state. Use torch.optim.AdamW (decoupled decay), "
                "decoupled_weight_decay=True where the optimizer has it, or compact=False."
            )
    return None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


class SlotBuffer:
    """``capacity`` slots standing in for the selected entries of some parameters.

    Slot ``s`` holds entry ``index[s]`` of parameter ``leaf[s]`` (positions in the
    optimizer's leaf order) once filled; slots fill in order and are never freed.

    Example:
      >>> w = torch.arange(6.0).reshape(2, 3)
      >>> buf = SlotBuffer(4, torch.float32, torch.device("cpu"))
      >>> buf.add(0, torch.tensor([1, 5]))
      >>> _ = buf.load([w], grads=False)
      >>> buf.param.tolist()
      [1.0, 5.0, 0.0, 0.0]
    """

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        self.param = torch.nn.Parameter(torch.zeros(capacity, dtype=dtype, device=device))
        self.param.grad = torch.zeros_like(self.param)
        self.state: dict[str, Any] = {}  # the inner optimizer's state for ``param``
        self.filled = 0
        # per leaf: (flat indices into the parameter, slots), in slot order
        self.members: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, leaf: int, indices: torch.Tensor) -> None:
        """Gives the entries ``indices`` (flat, int64) of parameter ``leaf`` the next slots."""
        n = int(indices.numel())
        if n == 0:
            return
        if self.filled + n > self.capacity:
            raise RuntimeError(  # the method selected more than the budget: a bug, not user input
                f"compact state overflow: {self.filled + n} selected entries for "
                f"{self.capacity} slots."
            )
        device = self.param.device
        indices = indices.to(device=device, dtype=torch.int64)
        slots = torch.arange(self.filled, self.filled + n, device=device)
        if leaf in self.members:
            old_idx, old_slots = self.members[leaf]
            indices, slots = torch.cat([old_idx, indices]), torch.cat([old_slots, slots])
        self.members[leaf] = (indices, slots)
        self.filled += n

    def add_runs(self, runs: Sequence[tuple[int, int, int]], indices: np.ndarray) -> None:
        """:meth:`add` for several leaves at once: ``(leaf, start, stop)`` gives ``leaf`` the
        entries ``indices[start:stop]`` (flat, int64); the slots follow in that order."""
        n = sum(b - a for _, a, b in runs)
        if self.filled + n > self.capacity:
            raise RuntimeError(  # the method selected more than the budget: a bug, not user input
                f"compact state overflow: {self.filled + n} selected entries for "
                f"{self.capacity} slots."
            )
        device = self.param.device
        first = runs[0][1]
        new_idx = torch.from_numpy(indices[first:runs[-1][2]]).to(device)
        new_slots = torch.arange(self.filled, self.filled + n, device=device)
        offset = 0
        for leaf, a, b in runs:
            idx, slots = new_idx[a - first:b - first], new_slots[offset:offset + b - a]
            offset += b - a
            if leaf in self.members:
                old_idx, old_slots = self.members[leaf]
                idx, slots = torch.cat([old_idx, idx]), torch.cat([old_slots, slots])
            self.members[leaf] = (idx, slots)
        self.filled += n

    def load(self, params: Sequence[torch.Tensor], grads: bool = True,
             gathered: set[int] | None = None) -> list[int]:
        """Copies the members' values (and gradients) into the buffer; returns the leaves
        that have no gradient this step (their slots get gradient 0). With ``gathered``, the
        gradients are in the buffer already (:meth:`gather`) for those leaves, and the other
        members have none."""
        missing = []
        with torch.no_grad():
            for leaf, (idx, slots) in self.members.items():
                p = params[leaf]
                self.param.index_copy_(0, slots, _flat(p.detach()).index_select(0, idx))
                if not grads:
                    continue
                if gathered is not None:
                    if leaf not in gathered:
                        missing.append(leaf)
                        self.param.grad.index_fill_(0, slots, 0)
                elif p.grad is None:
                    missing.append(leaf)
                    self.param.grad.index_fill_(0, slots, 0)
                else:
                    self.param.grad.index_copy_(0, slots, _flat(p.grad).index_select(0, idx))
        return missing

    def gather(self, leaf: int, grad: torch.Tensor, accumulate: bool = False,
               start: int | None = None) -> None:
        """Copies (or adds) ``grad`` at the members of ``leaf`` into the buffer's gradient;
        with ``start``, ``grad`` is a part of the leaf's gradient: its flat entries ``start:``."""
        if leaf not in self.members:
            return
        idx, slots = self.members[leaf]
        flat = grad.reshape(-1)
        if start is not None:  # a part: its members only
            here = (idx >= start) & (idx < start + flat.numel())
            idx, slots = idx[here] - start, slots[here]
        with torch.no_grad():
            picked = flat.index_select(0, idx)
            if accumulate:  # the same addition autograd would have made on the dense gradient
                picked = self.param.grad.index_select(0, slots) + picked
            self.param.grad.index_copy_(0, slots, picked)

    def set_last_grads(self, leaf: int, values: torch.Tensor) -> None:
        """Sets the gradient of the last ``len(values)`` slots given to ``leaf``."""
        slots = self.members[leaf][1][-int(values.numel()):]
        self.param.grad.index_copy_(0, slots, values.to(self.param.grad.dtype))

    def store(self, params: Sequence[torch.Tensor], skip: Sequence[int] = ()) -> None:
        """Writes the buffer's values back into the members' entries (except ``skip`` leaves)."""
        with torch.no_grad():
            for leaf, (idx, slots) in self.members.items():
                if leaf not in skip:
                    _flat(params[leaf].data).index_copy_(0, idx, self.param.index_select(0, slots))

    def slots_of(self, leaves: Sequence[int]) -> torch.Tensor:
        """All slots of ``leaves`` (int64)."""
        parts = [self.members[leaf][1] for leaf in leaves if leaf in self.members]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def nbytes(self) -> int:
        """Bytes of the buffer, its gradient, its inner state and its slot bookkeeping."""
        tensors = [self.param, self.param.grad, *self.state.values()]
        for idx, slots in self.members.values():
            tensors += [idx, slots]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        leaves = torch.zeros(self.filled, dtype=torch.int64)
        indices = torch.zeros(self.filled, dtype=torch.int64)
        for leaf, (idx, slots) in self.members.items():
            leaves[slots.cpu()] = leaf
            indices[slots.cpu()] = idx.cpu()
        return {"capacity": self.capacity, "dtype": str(self.param.dtype).removeprefix("torch."),
                "leaves": leaves, "indices": indices, "state": dict(self.state)}

    def load_from(self, saved: dict[str, Any], place) -> None:
        """Restores slots and inner state saved by :meth:`state_dict`; ``place(key, value)``
        moves each state value to this buffer's device and dtype."""
        if int(saved["capacity"]) != self.capacity:
            raise ValueError(
                f"compact state saved with {saved['capacity']} slots; this optimizer has "
                f"{self.capacity} (different budget or parameters?)."
            )
        leaves = torch.as_tensor(saved["leaves"], dtype=torch.int64)
        indices = torch.as_tensor(saved["indices"], dtype=torch.int64)
        self.members, self.filled = {}, 0
        for leaf in torch.unique(leaves).tolist():
            slots = torch.nonzero(leaves == leaf).view(-1)
            self.members[leaf] = (indices[slots].to(self.param.device), slots.to(self.param.device))
        self.filled = int(leaves.numel())
        self.state = {k: place(k, v) for k, v in saved["state"].items()}


class CompactState:
    """The slot buffers of one selective optimizer, one per (param group, dtype, device).

    Args:
      params: the optimizer's parameters in leaf order.
      group_of: the param group of each parameter.
      selectable: whether each parameter can be selected (not choose_all, trainable).
      choose_all: whether each parameter is a trainable choose_all parameter (stays dense).
      budget: entries the method may select outside choose_all.
    """

    def __init__(self, params: Sequence[torch.Tensor], group_of: Sequence[int],
                 selectable: Sequence[bool], choose_all: Sequence[bool], budget: int):
        self._group_of = list(group_of)
        self._key_of: dict[int, tuple] = {}
        sizes: dict[tuple, int] = {}
        for i, (p, ok) in enumerate(zip(params, selectable)):
            if ok:
                key = (group_of[i], p.dtype, p.device)
                self._key_of[i] = key
                sizes[key] = sizes.get(key, 0) + p.numel()
        self.buffers = {
            key: SlotBuffer(min(budget, n), key[1], key[2]) for key, n in sizes.items()
        }
        self._dense = [(i, p) for i, (p, c) in enumerate(zip(params, choose_all)) if c]

    def add(self, leaf: int, indices: torch.Tensor) -> None:
        """Records newly selected entries ``indices`` (flat) of parameter ``leaf``."""
        self.buffers[self._key_of[leaf]].add(leaf, indices)

    def add_entries(self, leaves: np.ndarray, indices: np.ndarray) -> None:
        """Records newly selected entries ``indices[j]`` (flat) of parameters ``leaves[j]``
        (int64 NumPy arrays, as :meth:`MethodRunner.update_entries` gives them), leaf after
        leaf in ascending order, in their given order within a leaf.

        Example:
          >>> import numpy as np
          >>> ps = [torch.zeros(4), torch.zeros(3)]
          >>> state = CompactState(ps, [0, 0], [True, True], [False, False], budget=3)
          >>> state.add_entries(np.array([1, 0, 1]), np.array([2, 3, 0]))
          >>> state.indices_of(0).tolist(), state.indices_of(1).tolist()
          ([3], [2, 0])
        """
        if len(leaves) == 0:
            return
        by_leaf = np.argsort(leaves, kind="stable")
        leaves, indices = leaves[by_leaf], indices[by_leaf]
        cuts = (np.flatnonzero(leaves[1:] != leaves[:-1]) + 1).tolist()
        starts, ends = [0, *cuts], [*cuts, len(leaves)]
        ids = leaves[starts].tolist()
        where = [self._key_of[leaf] for leaf in ids]
        for key in dict.fromkeys(where):  # one call per buffer, its leaves in order
            parts = [(leaf, a, b) for leaf, k, a, b in zip(ids, where, starts, ends) if k == key]
            self.buffers[key].add_runs(parts, indices)

    def add_mask(self, leaf: int, mask: torch.Tensor, old: torch.Tensor | None = None) -> None:
        """Records the entries true in ``mask`` (and false in ``old``) of parameter ``leaf``."""
        new = mask if old is None else mask & ~old
        self.add(leaf, torch.nonzero(new.reshape(-1)).view(-1))

    def gather(self, leaf: int, grad: torch.Tensor, accumulate: bool = False,
               start: int | None = None) -> None:
        """Copies (or adds) ``grad`` of parameter ``leaf`` at its selected entries into the
        slot gradients, so the dense gradient can be freed (``stream_grads=True``); with
        ``start``, ``grad`` holds the leaf's flat entries ``start:`` only (a block of rows)."""
        self.buffers[self._key_of[leaf]].gather(leaf, grad, accumulate, start)

    def set_grads(self, leaf: int, values: torch.Tensor) -> None:
        """Gives the entries just added to ``leaf`` (by :meth:`add`) their gradient ``values``."""
        if values.numel():
            self.buffers[self._key_of[leaf]].set_last_grads(leaf, values)

    @torch.no_grad()
    def scale_grads(self, coef: torch.Tensor) -> None:
        """Multiplies the slot gradients (the gathered ones, ``stream_grads=True``) by
        ``coef``, as ``torch.nn.utils.clip_grads_with_norm_`` does to dense gradients."""
        for buf in self.buffers.values():
            buf.param.grad.mul_(coef.to(buf.param.grad.device))

    def buffer_key(self, leaf: int) -> tuple | None:
        """The ``(group, dtype, device)`` key of the slot buffer of parameter ``leaf`` (None
        for a parameter that cannot be selected)."""
        return self._key_of.get(leaf)

    def indices_of(self, leaf: int) -> torch.Tensor:
        """The selected entries of parameter ``leaf`` (flat int64 indices, in slot order)."""
        buf = self.buffers.get(self._key_of.get(leaf))
        if buf is None or leaf not in buf.members:
            return torch.zeros(0, dtype=torch.int64)
        return buf.members[leaf][0]

    def mask_of(self, leaf: int, param: torch.Tensor) -> torch.Tensor:
        """A bool mask shaped like ``param``, true at the selected entries of ``leaf``: the
        slot indices are the record of what is selected, so no mask is kept."""
        m = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
        m[self.indices_of(leaf).to(param.device)] = True
        return m.reshape(param.shape)

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.buffers.values())

    @contextlib.contextmanager
    def inner_view(self, optimizer: torch.optim.Optimizer,
                   params: Sequence[torch.Tensor], gathered: set[int] | None = None) -> Iterator[None]:
        """Inside: ``optimizer.param_groups`` hold the choose_all params and the slot buffers
        (with their state), filled from ``params`` (gradients: see :meth:`SlotBuffer.load`).
        On exit the buffers' values are written back, the real params and state are put back."""
        missing: dict[tuple, list[int]] = {}
        held: dict[tuple, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        for key, buf in self.buffers.items():
            missing[key] = buf.load(params, gathered=gathered)
            if missing[key]:  # keep these leaves' slot state as it is (see module docstring)
                slots = buf.slots_of(missing[key])
                held[key] = (slots, {k: v.index_select(0, slots) for k, v in buf.state.items()
                                     if isinstance(v, torch.Tensor) and v.shape == buf.param.shape})
        saved_params = [g["params"] for g in optimizer.param_groups]
        views: list[list[torch.Tensor]] = [[] for _ in optimizer.param_groups]
        for i, p in self._dense:
            views[self._group_of[i]].append(p)
        for key, buf in self.buffers.items():
            views[key[0]].append(buf.param)
            if buf.state:
                optimizer.state[buf.param] = buf.state
        try:
            for g, v in zip(optimizer.param_groups, views):
                g["params"] = v
            yield
        finally:
            for g, v in zip(optimizer.param_groups, saved_params):
                g["params"] = v
            for key, buf in self.buffers.items():
                buf.state = optimizer.state.pop(buf.param, {})
                if key in held:
                    slots, values = held[key]
                    for k, v in values.items():
                        buf.state[k].index_copy_(0, slots, v)
                buf.store(params, skip=missing[key])

    def reload_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Copies the gradients into the buffers again (after a closure re-evaluated them)."""
        for buf in self.buffers.values():
            buf.load(params)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(group=key[0], **buf.state_dict()) for key, buf in self.buffers.items()]

    def load_state_dict(self, saved: Sequence[dict[str, Any]], place) -> None:
        if len(saved) != len(self.buffers):
            raise ValueError(
                f"state_dict holds {len(saved)} compact slot buffers, this optimizer has "
                f"{len(self.buffers)}: was it saved with compact=True on the same parameters?"
            )
        for (key, buf), s in zip(self.buffers.items(), saved):
            if int(s["group"]) != key[0] or s["dtype"] != str(key[1]).removeprefix("torch."):
                raise ValueError(
                    f"compact slot buffer saved for group {s['group']} ({s['dtype']}), expected "
                    f"group {key[0]} ({key[1]})."
                )
            buf.load_from(s, lambda k, v, b=buf, gi=key[0]: place(b.param, gi, k, v))
