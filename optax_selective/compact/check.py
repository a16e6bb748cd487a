"""Consistency of a compact inner state with its mask, on the host (restored checkpoints).

Example:
  >>> import jax.numpy as jnp, optax, optax_selective as osel
  >>> from optax_selective.compact.check import compact_problems
  >>> params = [jnp.array([3.0, 0.1, -0.2])]
  >>> state = osel.selective_pafi(budget=2, inner=optax.sgd(0.1)).init(params)
  >>> compact_problems(state.inner_state, [jnp.array([True, True, False])], params, budget=2)
  ['compact slot 1 of float32 points at leaf 0 entry 2, which its mask does not select', 'leaf 0: its mask selects 2 entries, its compact slots hold 1']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from optax_selective.compact.state import CompactState, slot_groups


def compact_problems(state: CompactState, masks: Sequence[Any], params: Sequence[Any] | None = None,
                     budget: int | None = None, names: Sequence[str] | None = None) -> list[str]:
    """What is inconsistent between a compact inner ``state`` and the mask leaves ``masks``
    (in leaf order): fill counts, slots out of range, repeated or outside the mask, masked
    entries without a slot. With ``params`` and ``budget`` the slot buffers' sizes and dtypes
    are compared with the layout ``tx.init(params)`` gives. Empty when all is well; at most
    about 20 entries. Vectorized: O(budget log budget + leaves).
    """
    names = list(names) if names is not None else [f"leaf {i}" for i in range(len(masks))]
    flat = [np.asarray(m).reshape(-1) for m in masks]
    if len(state.leaf) != len(state.slots) or len(state.filled) != len(state.slots):
        return ["compact state lacks its per-slot leaf positions or fill counts"]
    groups = slot_groups(params, budget) if params is not None and budget is not None else None
    if groups is not None and [g.cap for g in groups] != [int(np.size(s)) for s in state.slots]:
        return [f"compact slot buffers have sizes {[int(np.size(s)) for s in state.slots]}, "
                f"budget {budget} gives {[g.cap for g in groups]} (another budget or model?)"]
    out: list[str] = []
    slotted = np.zeros(len(flat), np.int64)
    for j, (slots, ids, filled) in enumerate(zip(state.slots, state.leaf, state.filled)):
        slots = np.asarray(slots).reshape(-1).astype(np.int64)
        ids = np.asarray(ids).reshape(-1).astype(np.int64)
        filled = int(np.asarray(filled))
        label = str(groups[j].dtype) if groups else f"#{j}"
        valid = slots >= 0
        used = int(valid.sum())
        if ids.shape != slots.shape or not 0 <= filled <= slots.size or used != filled or (
                filled and not valid[:filled].all()):
            out.append(f"compact slot buffer {label}: filled={filled} but {used} of its "
                       f"{slots.size} slots are in use")
            continue
        if bool((slots < -1).any()):
            out.append(f"compact slot buffer {label}: slot indices below -1")
        v = np.flatnonzero(valid)
        leaf, idx = ids[v], slots[v]
        members = np.zeros(len(flat), bool)
        members[list(groups[j].leaves) if groups else slice(None)] = True
        bad = (leaf < 0) | (leaf >= len(flat))
        bad[~bad] = ~members[leaf[~bad]]
        if bad.any():
            s = int(v[np.flatnonzero(bad)[0]])
            out.append(f"compact slot {s} of {label} names leaf {int(ids[s])}, not one of "
                       "its dtype")
            continue
        order = np.lexsort((idx, leaf))
        leaf, idx, v = leaf[order], idx[order], v[order]
        rep = np.flatnonzero((leaf[1:] == leaf[:-1]) & (idx[1:] == idx[:-1]))
        if rep.size:
            s = int(v[rep[0] + 1])
            out.append(f"compact slot {s} of {label} repeats {names[int(leaf[rep[0]])]} entry "
                       f"{int(idx[rep[0]])}")
        cuts = np.flatnonzero(leaf[1:] != leaf[:-1]) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), leaf.size]):
            if a == b:
                continue
            i, seg = int(leaf[a]), idx[a:b]
            if int(seg[-1]) >= flat[i].size:
                out.append(f"compact slot {int(v[b - 1])} of {label} points at {names[i]} entry "
                           f"{int(seg[-1])}, outside its {flat[i].size} entries")
                continue
            hit = flat[i][seg].astype(bool)
            if not hit.all():
                k = int(np.flatnonzero(~hit)[0])
                out.append(f"compact slot {int(v[a + k])} of {label} points at {names[i]} entry "
                           f"{int(seg[k])}, which its mask does not select")
            slotted[i] += int(hit.sum())
        if len(out) > 20:
            return out
    for i, m in enumerate(flat):
        n = int(m.sum())
        if n != slotted[i] and (groups is None or any(i in g.leaves for g in groups)):
            out.append(f"{names[i]}: its mask selects {n} entries, its compact slots hold "
                       f"{int(slotted[i])}")
    return out
