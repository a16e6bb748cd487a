"""Checks a selective optimizer's state dict before ``load_state_dict`` changes anything.

A state dict is refused with a ``ValueError`` that names the mismatch when it was saved over
other parameter shapes, with another budget, with masks holding more entries than the budget
(or duplicate or out-of-range entries), with a negative or non-integer step count, with inner
optimizer state of other shapes, or by selective-optimizers 0.4. The optimizer is then left
exactly as it was (see ``SelectiveOptimizer.load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from optax_selective.methods import LeafLayout
from torch_bridge.compact import CompactState
from torch_bridge.distributed import mask_from_indices

FULL, EMPTY, PARTIAL = "full", "empty", "partial"
MAX_STEP_COUNT = 2**63 - 1

# Per-parameter state entries of torch.optim's elementwise optimizers that are scalars (the
# rest have the parameter's shape), and those that hold a square, sum or size and so cannot be
# negative (a negative one gives NaN through sqrt, or flips the update's sign).
SCALAR_STATE = frozenset({"step", "mu_product", "eta", "mu"})
NONNEGATIVE_STATE = frozenset({"step", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum",
                               "acc_delta", "exp_inf", "step_size", "eta"})

# Inner optimizers whose per-parameter state tensors all have the parameter's shape.
SAME_SHAPE_STATE: tuple[type, ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad,
    torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.Adadelta, torch.optim.ASGD, torch.optim.Rprop,
)


def legacy_state_message(state_dict: dict[str, Any]) -> str | None:
    """The explanation for a selective-optimizers 0.4 optimizer state (None if it is not one)."""
    groups = state_dict.get("param_groups")
    if isinstance(groups, list) and any(isinstance(g, dict) and "chosen_masks" in g for g in groups):
        return (
            "state_dict is a selective-optimizers 0.4 optimizer state (its param_groups carry "
            "'chosen_masks'); this version stores masks and step counts differently and cannot "
            "resume it. To continue: load the trained weights (the model checkpoint, or "
            "load_weights_from_summary with the 0.4 summary) into the model and build a new "
            "selective optimizer, which selects its entries again from there; or finish the run "
            "with selective-optimizers 0.4."
        )
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_state(
    sel: Any,
    state_dict: dict[str, Any],
    *,
    params: Sequence[torch.Tensor],
    paths: Sequence[str],
    layout: LeafLayout,
    method: str,
    budget: int | None,
    compact: CompactState | None,
    inner_class: type,
) -> tuple[list[str], list[Any]]:
    """Validates the ``"selective"`` entry ``sel`` and the inner state of ``state_dict`` against
    an optimizer; returns the status and masks to install. Raises ``ValueError``.

    Args:
      sel: ``state_dict["selective"]`` as ``SelectiveOptimizer.state_dict`` writes it.
      state_dict: the rest of the state dict (the inner optimizer's ``state`` is checked).
      params: the optimizer's parameters in leaf order.
      paths: their names, for the messages.
      layout: their layout (which can be selected, which are choose_all).
      method: the name of the optimizer's method.
      budget: the optimizer's budget (None: no limit).
      compact: the optimizer's compact state, or None for the dense form.
      inner_class: the inner ``torch.optim.Optimizer`` class.

    Example:
      >>> import torch
      >>> from optax_selective.methods import LeafLayout
      >>> p = torch.zeros(3)
      >>> layout = LeafLayout(paths=("p",), shapes=((3,),), selectable=(True,), choose_all=(False,))
      >>> mine = dict(params=[p], paths=["p"], layout=layout, method="pafi", budget=2,
      ...             compact=None, inner_class=torch.optim.SGD)
      >>> check_state({"method": "pafi", "count": 0, "masks": [torch.tensor([0, 2])]}, {}, **mine)
      (['partial'], [tensor([ True, False,  True])])
      >>> check_state({"method": "pafi", "count": 0, "masks": [torch.tensor([0, 1, 2])]}, {}, **mine)
      Traceback (most recent call last):
      ValueError: state_dict masks hold 3 selected entries, more than this optimizer's budget 2.
    """
    if not isinstance(sel, dict) or not {"method", "count", "masks"} <= set(sel):
        raise ValueError("state_dict['selective'] must be a dict with 'method', 'count' and "
                         "'masks' (as SelectiveOptimizer.state_dict writes).")
    if sel["method"] != method:
        raise ValueError(f"state_dict was saved by method {sel['method']!r}, not {method!r}.")
    count = sel["count"]
    if not _is_int(count) or not 0 <= count <= MAX_STEP_COUNT:
        raise ValueError(f"state_dict step count {count!r} must be an int >= 0 and at most "
                         f"{MAX_STEP_COUNT} (2**63 - 1, what an int64 holds).")
    if "budget" in sel and sel["budget"] != budget:
        raise ValueError(
            f"state_dict was saved with budget {sel['budget']}, this optimizer has budget "
            f"{budget}; build the optimizer with budget={sel['budget']} to resume."
        )
    if "shapes" in sel:
        shapes = sel["shapes"]
        if not isinstance(shapes, list) or len(shapes) != len(params):
            raise ValueError(
                f"state_dict was saved over {len(shapes) if isinstance(shapes, list) else '?'} "
                f"parameters, this optimizer has {len(params)}."
            )
        for path, s, p in zip(paths, shapes, params):
            if list(s) != list(p.shape):
                raise ValueError(f"{path}: state_dict was saved for shape {tuple(s)}, the "
                                 f"optimizer's parameter has shape {tuple(p.shape)}.")
    masks = sel["masks"]
    if not isinstance(masks, list) or len(masks) != len(params):
        n = len(masks) if isinstance(masks, list) else "?"
        raise ValueError(f"state_dict holds masks for {n} parameters, the optimizer has "
                         f"{len(params)}.")
    status, tensors, total = [], [], 0
    for i, (entry, p) in enumerate(zip(masks, params)):
        can_select = layout.selectable[i] or layout.choose_all[i]
        if isinstance(entry, str):
            if entry not in (FULL, EMPTY):
                raise ValueError(f"bad mask entry {entry!r} for {paths[i]}.")
            if entry == FULL:
                if not can_select:
                    raise ValueError(f"{paths[i]}: state_dict selects all of it, but this "
                                     "optimizer cannot train it (frozen or not floating point).")
                total += p.numel()
            elif layout.choose_all[i]:
                raise ValueError(f"{paths[i]}: state_dict selects none of it, but it is in a "
                                 "choose_all group here.")
            status.append(entry)
            tensors.append(None)
            continue
        idx = torch.as_tensor(entry)
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{paths[i]}: mask entries must be a 1-D int64 tensor of flat "
                             f"indices, got {tuple(idx.shape)} {idx.dtype}.")
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise ValueError(f"mask indices out of range for {paths[i]} {tuple(p.shape)}.")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"{paths[i]}: mask indices repeat or are not increasing.")
        if idx.numel() and not layout.selectable[i]:
            raise ValueError(f"{paths[i]}: state_dict selects entries of it, but this optimizer "
                             "cannot select it (frozen, not floating point, or choose_all).")
        total += idx.numel()
        status.append(PARTIAL)
        tensors.append(mask_from_indices(p, idx))
    if budget is not None and total > budget:
        raise ValueError(
            f"state_dict masks hold {total} selected entries, more than this optimizer's budget "
            f"{budget}."
        )
    if (compact is not None) != ("compact" in sel):
        raise ValueError(
            "state_dict was saved with compact="
            f"{'compact' in sel} but this optimizer has compact={compact is not None}."
        )
    _check_inner_state(state_dict, params, paths, inner_class)
    if compact is not None:
        _check_compact(compact, sel["compact"], status, tensors, params, paths)
    return status, tensors


def _check_inner_state(state_dict: dict[str, Any], params: Sequence[torch.Tensor],
                       paths: Sequence[str], inner_class: type) -> None:
    state = state_dict.get("state", {})
    if not isinstance(state, dict):
        raise ValueError("state_dict['state'] must be a dict.")
    if not issubclass(inner_class, SAME_SHAPE_STATE):
        return
    for key, per_param in state.items():
        if not _is_int(key) or not 0 <= key < len(params) or not isinstance(per_param, dict):
            continue  # torch itself keeps entries it cannot map; nothing of ours reads them
        p = params[key]
        for name, v in per_param.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise ValueError(
                    f"{paths[key]}: state_dict's {inner_class.__name__} state "
                    f"{name!r} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)} (saved "
                    "over other parameters?)."
                )
            check_state_value(f"{paths[key]}: state_dict's {inner_class.__name__} state",
                              name, v, tuple(p.shape))


def check_state_value(where: str, name: str, value: Any, shape: tuple[int, ...]) -> None:
    """Refuses one per-parameter state entry of an elementwise ``torch.optim`` optimizer that
    the optimizer cannot use: a non-scalar entry (``exp_avg``, ``momentum_buffer``, ...) that is
    not a floating-point tensor of the parameter's ``shape``; a ``step`` that is not a whole
    number; NaN or infinity anywhere; a negative square or step (``exp_avg_sq``, ``step``, ...).

    Raises:
      ValueError: naming ``where``, the entry and the fix.

    Example:
      >>> import torch
      >>> check_state_value("w", "exp_avg", torch.zeros(3), (3,))  # fine: no error
      >>> check_state_value("w", "exp_avg_sq", torch.tensor([0.0, -1.0, 0.0]), (3,))
      Traceback (most recent call last):
      ValueError: w 'exp_avg_sq' holds negative values; a square cannot be negative (the file was forged or damaged); save the state again.
    """
    fix = "(the file was forged or damaged); save the state again."
    if name in SCALAR_STATE:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"{where} {name!r} must be a real number (a 1-element tensor), "
                                 f"got shape {tuple(value.shape)} {value.dtype} {fix}")
            x = float(value.reshape(-1)[0])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            x = float(value)
        else:
            raise ValueError(f"{where} {name!r} must be a number, got {type(value).__name__} {fix}")
        if x != x or x in (float("inf"), float("-inf")):
            raise ValueError(f"{where} {name!r} is {x} {fix}")
        if name == "step" and (x < 0 or x != int(x)):
            raise ValueError(f"{where} 'step' is {x}; a step count is a whole number >= 0 {fix}")
        if name in NONNEGATIVE_STATE and x < 0:
            raise ValueError(f"{where} {name!r} is {x}, it cannot be negative {fix}")
        return
    if not isinstance(value, torch.Tensor):
        return  # e.g. Rprop's python values: torch checks them itself
    if not (value.is_floating_point() or value.is_complex()) or tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where} {name!r} is a {tuple(value.shape)} {value.dtype} tensor; it "
                         f"must be a floating-point tensor of the parameter's shape {shape} {fix}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where} {name!r} holds NaN or infinity {fix}")
    if (name in NONNEGATIVE_STATE and value.numel() and not value.is_complex()
            and bool((value < 0).any())):
        raise ValueError(f"{where} {name!r} holds negative values; a square cannot be negative "
                         f"{fix}")


def _check_compact(compact: CompactState, saved: Any, status: list[str], masks: list[Any],
                   params: Sequence[torch.Tensor], paths: Sequence[str]) -> None:
    if not isinstance(saved, list) or len(saved) != len(compact.buffers):
        n = len(saved) if isinstance(saved, list) else "?"
        raise ValueError(
            f"state_dict holds {n} compact slot buffers, this optimizer has "
            f"{len(compact.buffers)}: was it saved with compact=True on the same parameters?"
        )
    for (key, buf), s in zip(compact.buffers.items(), saved):
        if not isinstance(s, dict) or not {"group", "dtype", "capacity", "leaves", "indices",
                                           "state"} <= set(s):
            raise ValueError("a compact slot buffer of state_dict is malformed.")
        if s["group"] != key[0] or s["dtype"] != str(key[1]).removeprefix("torch."):
            raise ValueError(
                f"compact slot buffer saved for group {s['group']} ({s['dtype']}), expected "
                f"group {key[0]} ({key[1]})."
            )
        if s["capacity"] != buf.capacity:
            raise ValueError(
                f"compact state saved with {s['capacity']} slots; this optimizer has "
                f"{buf.capacity} (different budget or parameters?)."
            )
        leaves, indices = torch.as_tensor(s["leaves"]), torch.as_tensor(s["indices"])
        if leaves.dim() != 1 or leaves.shape != indices.shape or leaves.numel() > buf.capacity:
            raise ValueError(f"compact slot buffer of group {key[0]}: leaves and indices must be "
                             f"1-D, of equal length, at most {buf.capacity}.")
        for leaf in torch.unique(leaves).tolist():
            if compact.buffer_key(leaf) != key:
                raise ValueError(f"compact slot buffer of group {key[0]} names parameter {leaf}, "
                                 "which does not belong to it.")
            idx = indices[leaves == leaf].to(torch.int64)
            p, m = params[leaf], masks[leaf]
            if int(idx.min()) < 0 or int(idx.max()) >= p.numel():
                raise ValueError(f"compact slot indices out of range for {paths[leaf]}.")
            selected = status[leaf] == FULL or (
                m is not None and bool(m.reshape(-1)[idx].all()))
            if not selected or idx.unique().numel() != idx.numel():
                raise ValueError(f"compact slots of {paths[leaf]} do not match its mask.")
        for leaf in range(len(params)):
            if compact.buffer_key(leaf) != key:
                continue
            want = {FULL: params[leaf].numel(), EMPTY: 0}.get(
                status[leaf], 0 if masks[leaf] is None else int(masks[leaf].sum()))
            have = int((leaves == leaf).sum())
            if have != want:
                raise ValueError(
                    f"compact slots of {paths[leaf]} hold {have} entries but its mask selects "
                    f"{want}: every selected entry needs its slot (the state was forged or "
                    "damaged); save it again."
                )
        if not isinstance(s["state"], dict):
            raise ValueError(f"compact slot buffer of group {key[0]}: its 'state' must be a dict "
                             f"of the inner optimizer's state, got {type(s['state']).__name__}.")
        for name, v in s["state"].items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != (buf.capacity,):
                raise ValueError(f"compact state {name!r} has shape {tuple(v.shape)}, expected "
                                 f"({buf.capacity},).")
            check_state_value(f"compact slot buffer of group {key[0]}: state", name, v,
                              (buf.capacity,))
