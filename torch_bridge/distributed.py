"""Global selection over parameters sharded across ``torch.distributed`` ranks (FSDP2, DTensor).

With FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` whose
rows are split over the ranks (``Shard(0)`` on a 1-D mesh). :class:`ShardedMethodRunner`
selects exactly what one process holding the whole model would select, without ever
gathering a parameter, a gradient or a score:

1. each rank scores its own shards with the method's own hooks (``shard_init`` and
   ``shard_update`` of :class:`optax_selective.methods.ShardedMethod`, written with the same
   JAX functions as the method's ``init`` and ``update``, called through DLPack) and keeps
   its top-``k_max`` entries, ``selection.shard_candidates``: the global top-``k`` is always
   among the union of these;
2. the ranks exchange only these candidates, ``k_max`` (score, leaf and index) pairs each,
   with ``all_gather``;
3. every rank runs ``selection.merge_candidates`` over them (ties go to the lower global
   index), so all ranks agree, and each marks the chosen entries that fall in its own shards.

No selection rule is stated here, and no method is named: scores, increments, budgets,
leading entries (BitFit's prefix) and the tie rule come from the method and
``optax_selective.selection``; this module only maps shards to global indices and moves
candidates between ranks. A method without the two hooks is refused with an error.

Communication per ID3 step: ``world_size * k_max`` floats and int64 indices, with
``k_max = ceil(budget / max_steps)``; PaFI and random exchange their ``budget`` candidates
once at init, FISH once at its last scoring step.
Masks are ``DTensor`` s placed like their parameters. Leaf order and global indices are
those of the unsharded parameters (DESIGN.md section 2).

Supported layouts: each parameter is a ``DTensor`` on a 1-D mesh with placement
``Shard(0)`` (FSDP2's layout, uneven splits included) or ``Replicate()``, or a plain tensor
(treated as replicated). Everything else raises ``NotImplementedError``. Every rank must call
``init`` and ``update`` together, with the same ``active`` leaves.

Example (each rank, after ``fully_shard(model)``)::

    runner = ShardedMethodRunner(ID3(budget=1000, max_steps=100), layout, params)
    masks = runner.init(params)
    ...
    new = runner.update(step, active, masks, [p.grad for p in params], params)
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

from optax_selective import selection
from optax_selective.methods import LeafLayout, ShardedMethod
from torch_bridge.jax_interop import state_from_tensors

# Compiled once per shape; the rules themselves are the shared ones of ``selection``.
_shard_candidates = jax.jit(selection.shard_candidates, static_argnums=1)
_merge_candidates = jax.jit(selection.merge_candidates, static_argnums=4)
_INDEX_LIMIT = 2**31  # merge_candidates takes int32 indices within a leaf


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a ``DTensor``. Without importing ``torch.distributed.tensor`` (half a
    second, on every ``import torch_bridge``): no DTensor exists until that module is loaded."""
    api = sys.modules.get("torch.distributed.tensor")
    return api is not None and isinstance(t, api.DTensor)


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``params`` is a ``DTensor`` (then use :class:`ShardedMethodRunner`)."""
    return any(_is_dtensor(p) for p in params)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of ``t`` (the tensor itself if it is not a ``DTensor``)."""
    return t.to_local() if _is_dtensor(t) else t


@dataclasses.dataclass(frozen=True)
class _Shard:
    """Where this rank's part of one parameter sits in the global index space."""

    global_start: int  # global index of this rank's first entry (leaf offset + flat offset)
    numel: int  # entries held here
    owner: bool  # whether this rank speaks for these entries (False: a replica elsewhere does)
    start: int = 0  # flat index, within its leaf, of this rank's first entry


def _placement_kind(p: torch.Tensor) -> str:
    if not _is_dtensor(p):
        return "replicate"
    if p.device_mesh.ndim != 1 or len(p.placements) != 1:
        raise NotImplementedError(
            f"selection over a {p.device_mesh.ndim}-D device mesh is not supported "
            f"(placements {p.placements}); shard parameters over a 1-D mesh (as FSDP2 does)."
        )
    from torch.distributed.tensor import Replicate, Shard

    (pl,) = p.placements
    if isinstance(pl, Shard) and pl.dim == 0:
        return "shard0"
    if isinstance(pl, Replicate):
        return "replicate"
    raise NotImplementedError(
        f"placement {pl} is not supported; use Shard(0) (FSDP2's default) or Replicate()."
    )


def _like(mask_local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The local mask ``mask_local`` as a tensor laid out like ``p`` (a DTensor if ``p`` is)."""
    if not _is_dtensor(p):
        return mask_local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        mask_local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
    )


class ShardedMethodRunner:
    """Runs a method on sharded parameters; same interface as the bridge's ``MethodRunner``.

    Args:
      method: an :class:`optax_selective.methods.ShardedMethod` (every built-in is one).
      layout: the static layout of the *global* (unsharded) parameters, in leaf order.
      params: the parameters (``DTensor`` s or plain tensors), in leaf order.
      group: the process group to exchange candidates over; by default the group of the
        parameters' mesh (or the default group for plain tensors).

    The selective optimizers use it by themselves when their parameters are ``DTensor`` s.

    Example:
      On plain tensors in one process (no exchange), it selects what the method's ``init``
      selects; every rank of an FSDP2 job calls it the same way on its ``DTensor`` s:

      >>> import torch
      >>> from optax_selective.methods import LeafLayout
      >>> from optax_selective.methods import PaFI
      >>> from torch_bridge.distributed import ShardedMethodRunner
      >>> params = [torch.tensor([0.5, -0.1, 2.0]), torch.tensor([0.0, 3.0])]
      >>> layout = LeafLayout(("a", "b"), ((3,), (2,)), (True, True), (False, False))
      >>> runner = ShardedMethodRunner(PaFI(budget=2), layout, params)
      >>> [m.tolist() for m in runner.init(params)]  # the 2 smallest |θ| of both leaves
      [[False, True, False], [True, False]]
    """

    def __init__(
        self,
        method,
        layout: LeafLayout,
        params: Sequence[torch.Tensor],
        group: dist.ProcessGroup | None = None,
    ):
        if not isinstance(method, ShardedMethod):
            missing = [h for h in ("shard_init", "shard_update") if not callable(getattr(method, h, None))]
            raise NotImplementedError(
                f"method {method.name!r} cannot select on sharded (DTensor/FSDP2) parameters: "
                f"it lacks {' and '.join(missing)} (see optax_selective.methods.ShardedMethod). "
                "Add them, or train without sharding the parameters."
            )
        self.method = method
        self.layout = layout
        self.method_state = None
        self.traces = 0
        self.exchanged: list[int] = []  # elements received by each all_gather (monitoring)
        kinds = [_placement_kind(p) for p in params]
        # Equal meshes (same devices, layout, names) count as one: ``fully_shard`` called per
        # layer without a mesh makes a new, equal mesh each time.
        meshes: list = []
        for p in params:
            if _is_dtensor(p) and not any(p.device_mesh == m for m in meshes):
                meshes.append(p.device_mesh)
        if len(meshes) > 1:
            raise NotImplementedError(
                "all sharded parameters must share one device mesh (equal devices and layout); "
                f"got {len(meshes)} different meshes: {meshes}. Shard every parameter over the "
                "same devices, e.g. pass one mesh = init_device_mesh(...) to every fully_shard."
            )
        if group is None and meshes:
            group = meshes[0].get_group(0)
        self.group = group
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if initialized else 0
        self.world = dist.get_world_size(group) if initialized else 1
        self._shards = self._locate(params, kinds)

    # -- where the entries are ---------------------------------------------------------------
    def _locate(self, params, kinds) -> list[_Shard]:
        rows = torch.tensor(
            [local(p).shape[0] if p.ndim and k == "shard0" else 0 for p, k in zip(params, kinds)],
            dtype=torch.int64,
        )
        all_rows = self._all_gather(rows)  # (world, n_params): one small exchange, at set-up
        shards, offset = [], 0
        for i, (p, kind) in enumerate(zip(params, kinds)):
            numel = p.numel()
            if kind == "shard0" and p.ndim:
                row = numel // p.shape[0] if p.shape[0] else 0
                if int(all_rows[:, i].sum()) != p.shape[0]:
                    raise NotImplementedError(f"parameter {i}: shards do not tile dim 0.")
                start = int(all_rows[: self.rank, i].sum()) * row
                shards.append(_Shard(offset + start, local(p).numel(), True, start))
            else:
                shards.append(_Shard(offset, numel, self.rank == 0))
            if numel >= _INDEX_LIMIT:
                raise NotImplementedError(
                    f"parameter {i} has {numel} entries; distributed selection indexes entries "
                    "within a parameter with int32 (< 2**31)."
                )
            offset += numel
        return shards

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        self.exchanged.append(t.numel() * self.world)
        return torch.stack(out)

    # -- the global top-k ----------------------------------------------------------------------
    def _select(
        self, scores: list[jax.Array | None], k: int, k_max: int
    ) -> list[torch.Tensor | None]:
        """Local masks of the global top-``k`` of ``scores`` (local JAX arrays, leaf order)."""
        # Replicated leaves: only one rank (the owner) offers their candidates.
        owned = [s if self._shards[i].owner else None for i, s in enumerate(scores)]
        vals, leaf, idx, _ = jax.block_until_ready(_shard_candidates(owned, k_max))
        leaf = torch.from_numpy(np.array(leaf)).to(torch.int64)
        starts = torch.tensor([sh.start for sh in self._shards] or [0], dtype=torch.int64)
        idx = torch.from_numpy(np.array(idx)).to(torch.int64) + starts[leaf]  # index in the leaf
        # One exchange of scores, one of (leaf, index) packed into int64.
        all_vals = self._all_gather(torch.from_numpy(np.array(vals))).reshape(-1)
        packed = self._all_gather((leaf << 32) | idx).reshape(-1)
        leaf, idx, valid = _merge_candidates(
            jnp.asarray(all_vals.numpy()),
            jnp.asarray((packed >> 32).numpy().astype(np.int32)),
            jnp.asarray((packed & 0xFFFFFFFF).numpy().astype(np.int32)),
            k,
            k_max,
        )
        valid = np.array(valid)
        leaf, idx = np.array(leaf)[valid], np.array(idx)[valid].astype(np.int64)
        out: list[torch.Tensor | None] = []
        for i, (sh, s) in enumerate(zip(self._shards, scores)):
            if s is None:
                out.append(None)
                continue
            mine = idx[(leaf == i) & (idx >= sh.start) & (idx < sh.start + sh.numel)] - sh.start
            m = torch.zeros(sh.numel, dtype=torch.bool)
            m[torch.from_numpy(mine)] = True
            out.append(m)
        return out

    # -- the method ----------------------------------------------------------------------------
    def init(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The method's first masks, placed like ``params``."""
        lay = self.layout
        shards = [self._to_jax(p) if ok else None for p, ok in zip(params, lay.selectable)]
        plan = self.method.shard_init(shards, [sh.start for sh in self._shards], lay)
        self.method_state = plan.state
        masks = [self._full(p, c) for p, c in zip(params, lay.choose_all)]
        leading = [
            torch.arange(sh.start, sh.start + sh.numel) < t if t else None
            for sh, t in zip(self._shards, plan.leading)
        ]
        masks = self._merge(masks, params, leading)
        if plan.scores is not None:
            masks = self._merge(masks, params, self._select(plan.scores, plan.k, plan.k))
        return masks

    def update(
        self,
        count: int,
        active: Sequence[int],
        masks: Sequence[torch.Tensor | None],
        grads: Sequence[torch.Tensor | None],
        params: Sequence[torch.Tensor],
    ) -> dict[int, torch.Tensor]:
        """One step of the method over the leaves in ``active`` (the others take no part)."""
        m = self.method
        if m.frozen_after is not None and count >= m.frozen_after:
            return {i: masks[i] for i in active}
        active_set = set(active)
        views = [
            [self._to_jax(t[i]) if i in active_set and (m.needs_params or t is not params) else None
             for i in range(len(params))]
            for t in (grads, params, masks)
        ]
        scores, k, self.method_state = m.shard_update(self.method_state, count, *views)
        self.traces += 1
        if scores is None:
            return {i: masks[i] for i in active}
        new = self._select(scores, k, m.k_max if m.k_max is not None else k)
        return {
            i: _like(
                local(masks[i]) | new[i].reshape(local(masks[i]).shape).to(local(masks[i]).device),
                params[i],
            )
            for i in active
        }

    def forget_masks(self) -> None:
        """Nothing is cached on the JAX side (kept for the ``MethodRunner`` interface)."""

    def state_tensors(self) -> list[torch.Tensor]:
        """This rank's part of the method's state as CPU tensors (for state dicts)."""
        return [torch.from_numpy(np.array(x)) for x in jax.tree.leaves(self.method_state)]

    def load_state_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Restores what :meth:`state_tensors` returned on this rank."""
        self.method_state = state_from_tensors(self.method_state, tensors)

    # -- helpers -------------------------------------------------------------------------------
    def _full(self, p: torch.Tensor, value: bool) -> torch.Tensor:
        lp = local(p)
        return _like(torch.full(lp.shape, value, dtype=torch.bool, device=lp.device), p)

    @staticmethod
    def _to_jax(t: torch.Tensor) -> jax.Array:
        t = local(t).detach()
        return jax.dlpack.from_dlpack(
            t.contiguous().cpu() if t.device.type != "cpu" else t.contiguous()
        )

    def _merge(self, masks, params, new):
        out = []
        for mk, p, n in zip(masks, params, new):
            if n is None:
                out.append(mk)
            else:
                lm = local(mk)
                out.append(_like(lm | n.reshape(lm.shape).to(lm.device), p))
        return out


# -- masks as whole tensors, for the optimizer's bookkeeping ------------------------------------
# Each function below takes plain tensors too (then it is the obvious one-liner), so the
# optimizer calls them unconditionally. On a sharded mask they exchange counts or the selected
# entries only (O(budget)), never a whole mask or parameter. Every rank must call them together.


def _group(t: DTensor) -> dist.ProcessGroup:
    return t.device_mesh.get_group(0)


def count_true(mask: torch.Tensor) -> int:
    """Number of true entries of the whole ``mask``."""
    if not _is_dtensor(mask):
        return int(mask.sum())
    n = mask.to_local().sum(dtype=torch.int64).reshape(1).cpu()
    if _placement_kind(mask) == "shard0":
        dist.all_reduce(n, group=_group(mask))
    return int(n)


def any_true(mask: torch.Tensor) -> bool:
    """Whether any entry of the whole ``mask`` is true."""
    return count_true(mask) > 0


def all_true(mask: torch.Tensor) -> bool:
    """Whether every entry of the whole ``mask`` is true."""
    return count_true(mask) == mask.numel()


def full_mask(param: torch.Tensor, value: bool) -> torch.Tensor:
    """An all-``value`` bool mask shaped and placed like ``param``."""
    lp = local(param)
    m = torch.full(lp.shape, value, dtype=torch.bool, device=lp.device)
    return _like(m, param)


def _flat_offset(t: DTensor) -> int:
    """Flat index, in the whole tensor, of this rank's first entry (Shard(0) on a 1-D mesh)."""
    rows = [None] * dist.get_world_size(_group(t))
    dist.all_gather_object(rows, t.to_local().shape[0] if t.ndim else 0, group=_group(t))
    me = dist.get_rank(_group(t))
    row = t.numel() // t.shape[0] if t.ndim and t.shape[0] else 0
    return sum(rows[:me]) * row


def selected_entries(param: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat indices, values)`` of ``param`` where ``mask`` is true, over the whole tensor, in
    increasing index order, on the CPU (the same on every rank)."""
    lm, lp = local(mask), local(param).detach()
    flat = lm.reshape(-1).nonzero().reshape(-1)
    values = lp.reshape(-1)[flat].cpu()
    flat = flat.cpu()
    if not _is_dtensor(mask) or _placement_kind(mask) == "replicate":
        return flat, values
    offset = _flat_offset(mask)
    parts = [None] * dist.get_world_size(_group(mask))
    dist.all_gather_object(parts, (flat + offset, values), group=_group(mask))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def mask_from_indices(param: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A bool mask like ``param``, true at ``indices`` (flat, over the whole tensor)."""
    lp = local(param)
    offset = (
        _flat_offset(param)
        if _is_dtensor(param) and _placement_kind(param) == "shard0"
        else 0
    )
    idx = indices.to(torch.int64).reshape(-1) - offset
    idx = idx[(idx >= 0) & (idx < lp.numel())]
    m = torch.zeros(lp.numel(), dtype=torch.bool, device=lp.device)
    m[idx.to(lp.device)] = True
    return _like(m.reshape(lp.shape), param)
