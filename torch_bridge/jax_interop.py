"""Runs the shared ``optax_selective`` methods on torch tensors, through DLPack.

Nothing here knows a selection rule: :class:`MethodRunner` hands torch tensors to a method's
``init`` / ``update`` (JAX functions over flat lists of leaves, in leaf order) and hands the
resulting masks back as torch bool tensors.

Cost per call: tensors go torch -> JAX with ``jax.dlpack.from_dlpack`` (per-step CPU gradients
as NumPy views, which ``jax.jit`` aliases with less overhead) and masks come back with
``torch.from_dlpack``; all are zero-copy when JAX can address the tensor's device (CPU
always; CUDA when a CUDA build of jaxlib is installed). ``update`` is jitted once per runner;
``jax.jit`` then keeps one compiled function per (shapes, dtypes, which leaves take part), so
steps do not recompile. The masks returned by the previous step stay on the JAX side and are
fed back without another conversion. ``update`` waits for JAX to finish before returning, so
torch may modify gradients and parameters in place right after.

The compact state (:mod:`torch_bridge.compact`) records the selection in its slots, so it
calls :meth:`MethodRunner.update_entries` instead: the masks never reach torch, each call
donates them to XLA (which writes the new masks over them rather than copying every mask
first), and the new entries come back as two arrays rather than one tensor per leaf.

Devices: selection runs on one *selection device*: the device of the first trainable
parameter. Leaves on other devices are copied there for the call (leaf by leaf; nothing is
concatenated across devices) and their masks are copied back. If JAX cannot address the
selection device (e.g. CUDA tensors with a CPU-only jaxlib), everything is copied through the
host instead, which works but costs two transfers of every trainable leaf per ID3 step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

# torch_bridge/__init__.py has already run torch_bridge._jax_env (no GPU pre-allocation).
import jax
import numpy as np
import torch

from optax_selective.methods import LeafLayout, Method

_INT32_MAX = 2**31 - 1
# dtypes NumPy can view (not bfloat16): per-step CPU inputs go to jax.jit as NumPy views
_NUMPY_VIEWABLE = {torch.float16, torch.float32, torch.float64, torch.bool, torch.uint8,
                   torch.int8, torch.int16, torch.int32, torch.int64}


def jax_can_address(device: torch.device) -> bool:
    """Whether ``jax.dlpack.from_dlpack`` accepts a tensor on ``device`` (zero-copy import)."""
    try:
        jax.dlpack.from_dlpack(torch.zeros(1, device=device))
    except Exception:  # noqa: BLE001 - any failure means: go through the host
        return False
    return True


class MethodRunner:
    """Drives one method over the parameters of one torch optimizer.

    Args:
      method: an ``optax_selective.methods.Method`` (a built-in or a registered one).
      layout: the static :class:`~optax_selective.methods.LeafLayout` of the parameters.
      params: the parameters, in leaf order (used to pick the selection device).

    Example:
      >>> import torch
      >>> from optax_selective.methods import LeafLayout
      >>> from optax_selective.methods import PaFI
      >>> w = torch.tensor([0.5, -0.1, 2.0, 0.0])
      >>> layout = LeafLayout(("w",), ((4,),), (True,), (False,))
      >>> runner = MethodRunner(PaFI(budget=2), layout, [w])
      >>> runner.init([w])[0].tolist()
      [False, True, False, True]
    """

    def __init__(self, method: Method, layout: LeafLayout, params: Sequence[torch.Tensor]):
        self.method = method
        self.layout = layout
        self.method_state = None
        self.traces = 0  # how often ``update`` was traced (compiled); tests read it
        trainable = [
            p for p, s, c in zip(params, layout.selectable, layout.choose_all) if s or c
        ]
        device = (trainable or list(params))[0].device
        if not jax_can_address(device):
            warnings.warn(
                f"JAX cannot address torch device {device} (is a CUDA build of jaxlib "
                "installed?); selection will copy tensors through the host every ID3 step.",
                RuntimeWarning,
                stacklevel=3,
            )
            device = torch.device("cpu")
        self.device = device
        self._jax_device = jax.dlpack.from_dlpack(torch.zeros(1, device=device)).device
        self._jax_masks: dict[int, jax.Array] = {}
        # CPU parameters keep their storage across steps (optimizers update them in place), so
        # their zero-copy JAX views are reused. Not on CUDA: there the DLPack import is what
        # orders JAX's reads after torch's stream.
        self._param_views: dict[int, tuple[torch.Tensor, int, jax.Array]] = {}
        self._update = jax.jit(self._update_impl)
        # update_entries: the masks are the runner's own (never seen by torch), so XLA may
        # write the new ones over them instead of copying every mask first. A runner uses
        # one of the two forms (the optimizer's dense or compact state): one compile.
        self._update_donating = jax.jit(self._update_impl, donate_argnums=0)
        self._exported: set[int] = set()  # leaves whose held mask torch has a view of
        self._empty: dict[torch.device, torch.Tensor] = {}

    # -- conversions -------------------------------------------------------------------------
    def to_jax(self, t: torch.Tensor) -> jax.Array:
        """Zero-copy view of ``t`` for JAX (copied first if on another device or strided)."""
        t = t.detach()
        if t.device != self.device:
            t = t.to(self.device, non_blocking=True)
        if not t.is_contiguous():
            t = t.contiguous()
        return jax.dlpack.from_dlpack(t)

    def step_view(self, t: torch.Tensor) -> jax.Array | np.ndarray:
        """``to_jax(t)`` for a per-step input (a gradient). On CPU it is a NumPy view instead:
        ``jax.jit`` takes it without a copy (aligned host buffers are aliased) and with about
        a tenth of the DLPack import's Python overhead (28 us per tensor here), which is most
        of the bridge's fixed cost per step on small models."""
        if t.device.type == "cpu" and self.device.type == "cpu" and t.dtype in _NUMPY_VIEWABLE:
            t = t.detach()
            return (t if t.is_contiguous() else t.contiguous()).numpy()
        return self.to_jax(t)

    def param_view(self, i: int, p: torch.Tensor) -> jax.Array:
        """``to_jax(p)``, reused across steps while ``p`` keeps the same CPU storage."""
        cached = self._param_views.get(i)
        if cached is not None and cached[0] is p and cached[1] == p.data_ptr():
            return cached[2]
        view = self.to_jax(p)
        if p.device.type == "cpu" and self.device.type == "cpu" and p.is_contiguous():
            if view.unsafe_buffer_pointer() == p.data_ptr():  # really zero-copy
                self._param_views[i] = (p, p.data_ptr(), view)
        return view

    @staticmethod
    def to_torch(a: jax.Array, device: torch.device) -> torch.Tensor:
        """Zero-copy torch view of a (ready) JAX array, moved to ``device`` if needed."""
        t = torch.from_dlpack(a)
        return t if t.device == device else t.to(device)

    # -- the method --------------------------------------------------------------------------
    def init(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The method's first masks (torch bool, on each parameter's device)."""
        jparams = [
            self.to_jax(p) if ok else None for p, ok in zip(params, self.layout.selectable)
        ]
        with jax.default_device(self._jax_device):
            masks, state = self.method.init(jparams, self.layout)
        # Committed to the selection device, like the state ``update`` returns: jax.jit keys
        # its compiled functions on committed-ness too, so an uncommitted first state would
        # compile ``update`` a second time at step 1.
        self.method_state = jax.device_put(state, self._jax_device)
        masks = jax.block_until_ready(masks)
        self._jax_masks.clear()
        self._exported.clear()
        return [self.to_torch(m, p.device) for m, p in zip(masks, params)]

    def _update_impl(self, masks, state, count, grads, params):
        self.traces += 1
        selectable = [g is not None for g in grads]
        # Always asked for: where the method knows them (ID3) it is also its faster form.
        return self.method.update(
            list(masks), state, count, list(grads), params, selectable, report_added=True
        )

    # -- checkpoints -------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """The method's state as CPU tensors, in ``jax.tree.leaves`` order (for state dicts)."""
        return [torch.from_numpy(np.array(x)) for x in jax.tree.leaves(self.method_state)]

    def load_state_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Restores what :meth:`state_tensors` returned, checked against the current state."""
        self.method_state = state_from_tensors(self.method_state, tensors, self._jax_device)

    def update(
        self,
        count: int,
        active: Sequence[int],
        masks: Sequence[torch.Tensor | None],
        grads: Sequence[torch.Tensor | None],
        params: Sequence[torch.Tensor],
        added: dict[int, torch.Tensor] | None = None,
    ) -> dict[int, torch.Tensor]:
        """One ``method.update`` over the leaves in ``active``; returns their new masks.

        Leaves outside ``active`` take no part (as if their gradient were missing) and keep
        their masks. ``count`` is the number of updates applied so far. With ``added`` (a dict)
        it is filled with the flat int64 indices of the entries this update selected, per
        leaf, on the leaf's device, for every leaf in ``active`` (empty if none) when the
        method reports them, and left empty when it does not (the caller then compares old
        and new masks).
        """
        new, reported = self._call(count, active, masks, grads, params, donate=False)
        self._exported.update(active)
        if added is not None and reported is not None:
            leaf, local = reported
            for i in active:
                added[i] = self._empty_on(params[i].device)
            for i in np.unique(leaf).tolist():
                added[i] = torch.from_numpy(local[leaf == i]).to(params[i].device)
        return {i: self.to_torch(new[i], params[i].device) for i in active}

    def update_entries(
        self,
        count: int,
        active: Sequence[int],
        masks: Sequence[torch.Tensor | None],
        grads: Sequence[torch.Tensor | None],
        params: Sequence[torch.Tensor],
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`update` for a caller that records the selection itself (the compact state).

        Returns the entries this update selected as two int64 NumPy arrays ``(leaf, index)``
        (leaf position, flat index in that leaf), or None when the method does not report
        them; then :meth:`torch_masks` gives the new masks to compare. The new masks stay on
        the JAX side, where the next call reads them: ``masks[i]`` is read only for a leaf
        the runner holds no mask of (the first call, or after :meth:`forget_masks`), so the
        caller may keep None there. Nothing is converted per leaf on the way back, and the
        update writes the new masks over the old ones (donated to XLA) instead of copying them.

        Example:
          >>> import torch
          >>> from optax_selective._tree import LeafLayout
          >>> from optax_selective.methods import ID3
          >>> w = torch.tensor([1.0, 1.0, 1.0, 1.0])
          >>> layout = LeafLayout(("w",), ((4,),), (True,), (False,))
          >>> runner = MethodRunner(ID3(budget=2, max_steps=2), layout, [w])
          >>> leaf, index = runner.update_entries(0, [0], runner.init([w]),
          ...                                     [torch.tensor([0.1, 0.4, 0.2, 0.3])], [w])
          >>> leaf.tolist(), index.tolist()
          ([0], [1])
        """
        return self._call(count, active, masks, grads, params, donate=True)[1]

    def torch_masks(self, leaves: Sequence[int], params: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """The masks the last update left for ``leaves``, as torch bool tensors (zero-copy
        views: the next :meth:`update_entries` copies these masks before it donates them)."""
        self._exported.update(leaves)
        return {i: self.to_torch(self._jax_masks[i], params[i].device) for i in leaves}

    def held_mask_nbytes(self, leaves: Sequence[int]) -> int:
        """Bytes of the JAX-side masks held for ``leaves`` (one per entry)."""
        return sum(int(self._jax_masks[i].size) for i in leaves if i in self._jax_masks)

    def _call(self, count, active, masks, grads, params, donate):
        """The jitted update; keeps the new masks (JAX side) and returns them with the
        reported entries as valid ``(leaf, index)`` int64 arrays (None if not reported).
        With ``donate``, the masks passed are given to XLA to overwrite: any that torch can
        see (its own tensors, views handed out) are copied first."""
        n = len(params)
        jm: list[jax.Array | None] = [None] * n
        jg: list[jax.Array | None] = [None] * n
        needs_params = self.method.needs_params
        jp: list[jax.Array | None] | None = [None] * n if needs_params else None
        held = self._jax_masks
        for i in active:
            m = held.get(i)
            if m is None or (donate and i in self._exported):
                m = self.to_jax(masks[i]) if m is None else m
                if donate:  # a buffer of the runner's own, on the selection device
                    m = jax.device_put(m, self._jax_device, may_alias=False)
            jm[i] = m
            jg[i] = self.step_view(grads[i])
            if needs_params:
                jp[i] = self.param_view(i, params[i])
        fn = self._update_donating if donate else self._update
        new, self.method_state, reported = fn(
            jm, self.method_state, np.int32(min(count, _INT32_MAX)), jg, jp
        )
        if reported is not None:
            leaf, local, valid = (np.asarray(a) for a in reported)
            reported = (leaf[valid].astype(np.int64), local[valid].astype(np.int64))
        new = jax.block_until_ready(new)  # torch may write the gradients JAX read right after
        for i in active:
            held[i] = new[i]
        self._exported.difference_update(active)
        return new, reported

    def _empty_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._empty:
            self._empty[device] = torch.empty(0, dtype=torch.int64, device=device)
        return self._empty[device]

    def forget_masks(self) -> None:
        """Drops the JAX-side copies of the masks (call after setting masks from torch)."""
        self._jax_masks.clear()
        self._exported.clear()
        self._param_views.clear()


def state_from_tensors(current, tensors, device=None):
    """``current``'s tree with its leaves replaced by ``tensors`` (same shapes and dtypes).

    Raises ``ValueError`` naming the first leaf whose count, shape or dtype differs.

    Example:
      >>> import jax.numpy as jnp
      >>> state_from_tensors((jnp.zeros(2), jnp.int32(0)), [torch.ones(2), torch.tensor(3, dtype=torch.int32)])
      (Array([1., 1.], dtype=float32), Array(3, dtype=int32))
    """
    leaves, treedef = jax.tree.flatten(current)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(leaves):
        raise ValueError(
            f"state_dict holds {len(tensors) if isinstance(tensors, (list, tuple)) else tensors!r} "
            f"method state arrays, the method keeps {len(leaves)}."
        )
    out = []
    for i, (old, t) in enumerate(zip(leaves, tensors)):
        a = np.asarray(torch.as_tensor(t).detach().cpu().numpy())
        old = np.asarray(old)
        if a.shape != old.shape or a.dtype != old.dtype:
            raise ValueError(
                f"method state array {i}: state_dict holds {a.dtype}{list(a.shape)}, the method "
                f"keeps {old.dtype}{list(old.shape)}."
            )
        out.append(jax.device_put(a, device) if device is not None else jax.numpy.asarray(a))
    return treedef.unflatten(out)
