"""A conformance check to run on your own selection method (and on the built-ins).

:func:`check_method` trains a small model with the method for a few steps and checks what
every caller of a :class:`~optax_selective.methods.Method` relies on:

* the interface is complete (attributes of the right types, ``init``, ``update``);
* the mask never exceeds the budget and only grows; it is fixed from ``frozen_after`` on;
* one update never adds more than ``k_max`` entries, and the entries ``update`` reports with
  ``report_added=True`` are exactly the ones it added (the compact state relies on them);
* the compact (O(budget)) and dense wrapper forms give the same parameters, and entries
  outside the mask never move;
* the jitted update compiles once (no retracing from step to step);
* the torch bridge selects the same entries as JAX, step by step (if torch is importable),
  also through its leafwise path for a method that declares
  :class:`~optax_selective.methods.LeafwiseMethod` (given by its registered name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_selective import methods as _methods
from optax_selective._tree import make_layout
from optax_selective.transform import selective

LR = 0.5  # a power of two: lr * g is exact, so JAX and torch SGD steps agree bit for bit


class ConformanceError(AssertionError):
    """A method broke one of the rules :func:`check_method` checks.

    Example:
      >>> import dataclasses
      >>> from optax_selective.testing import ConformanceError, check_method
      >>> @dataclasses.dataclass(frozen=True)
      ... class Broken:
      ...     budget: str = "10"  # must be an int (or None)
      ...     name: str = "broken"
      ...     needs_params: bool = False
      ...     frozen_after: int = 0
      ...     k_max: int = 0
      ...     def init(self, params, layout): ...
      ...     def update(self, mask, state, count, grads, params, selectable, *, report_added=False): ...
      >>> try:
      ...     check_method(Broken)
      ... except ConformanceError as e:
      ...     print(e)
      budget must be int or NoneType, got '10'.
    """


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`check_method` ran: the method, steps, entries selected, compilations.

    Attributes:
      name: the method's ``name``.
      steps: the updates run.
      budget_used: entries selected after the last update.
      traces: how many times the jitted update was traced (1: no retracing).
      torch_checked: whether the torch bridge was compared with JAX.

    Example:
      >>> from optax_selective.testing import check_method
      >>> check_method("fft", check_torch=False)  # every entry of default_params()
      Report(name='fft', steps=3, budget_used=116, traces=1, torch_checked=False)
    """

    name: str
    steps: int
    budget_used: int
    traces: int
    torch_checked: bool


def default_params(seed: int = 0) -> dict[str, jax.Array]:
    """A small pytree (three float32 leaves of 48, 8 and 60 entries) to check methods on.

    Example:
      >>> from optax_selective.testing import default_params
      >>> {name: leaf.shape for name, leaf in default_params(seed=1).items()}
      {'a': (6, 8), 'b': (8,), 'c': (3, 4, 5)}
    """
    rng = np.random.default_rng(seed)
    shapes = {"a": (6, 8), "b": (8,), "c": (3, 4, 5)}
    return {k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}


def check_method(
    method: str | Callable[..., Any],
    /,
    *,
    params: Any = None,
    steps: int | None = None,
    seed: int = 0,
    check_torch: bool | None = None,
    **kwargs: Any,
) -> Report:
    """Checks a method against the rules above; raises :class:`ConformanceError` if not.

    Args:
      method: a registered name (then ``kwargs`` go to its factory, and the torch check runs
        ``get_selective_optimizer(torch.optim.SGD, name)`` with them, as a user would), or a
        factory ``factory(**kwargs) -> Method`` (the torch check then drives the method
        object through the bridge's runner).
      params: the pytree to train (by default :func:`default_params`); float32 leaves.
      steps: updates to run (default: ``frozen_after + 2``, at least 3).
      seed: seeds the gradients.
      check_torch: compare with the torch bridge (default: if torch is importable).
      **kwargs: the method's arguments, e.g. ``budget=10, max_steps=3``.

    Returns:
      A :class:`Report`.

    Example:
      >>> from optax_selective.testing import check_method
      >>> check_method("pafi", budget=10, check_torch=False).budget_used
      10
    """
    name = method if isinstance(method, str) else None
    factory = _methods.get(method) if name is not None else method
    m = factory(**kwargs)
    _check_interface(m)
    params = default_params(seed) if params is None else params
    leaves, treedef = jax.tree.flatten(params)
    if steps is None:
        steps = max(3, (m.frozen_after or 0) + 2)
    rng = np.random.default_rng(seed + 1)
    grads = [
        treedef.unflatten([jnp.asarray(rng.normal(size=p.shape).astype(np.float32)) for p in leaves])
        for _ in range(steps)
    ]

    masks_dense, _, final_dense = _run_jax(m, params, grads, compact=False)
    _check_masks(m, masks_dense, leaves)
    try:
        masks, traces, final = _run_jax(m, params, grads, compact=True)
    except Exception as e:  # noqa: BLE001 - any failure here is the method's
        raise ConformanceError(f"the compact wrapper form failed: {e}") from e
    _same(masks, masks_dense, "compact and dense wrapper forms select different entries")
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(final_dense)):
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            raise ConformanceError(
                "compact and dense wrapper forms give different parameters: the entries "
                "update(report_added=True) reported are not the ones it added."
            )
    for p0, p1, mk in zip(leaves, jax.tree.leaves(final), masks[-1]):
        if not np.array_equal(np.asarray(p0)[~mk], np.asarray(p1)[~mk]):
            raise ConformanceError("an entry outside the final mask changed.")
    if traces > 1:
        raise ConformanceError(
            f"the jitted update was traced {traces} times in {steps} steps; keep static what "
            "decides shapes (Python ints on the method) and let count and state be arrays."
        )
    _check_update_directly(m, params, grads)

    torch_checked = False
    if check_torch is None:
        try:
            import torch  # noqa: F401
        except ImportError:
            check_torch = False
        else:
            check_torch = True
    if check_torch:
        _check_torch(name, kwargs, m, leaves, grads, treedef, masks)
        if name is not None and isinstance(m, _methods.LeafwiseMethod) and m.leafwise:
            _check_torch_leafwise(name, kwargs, leaves, grads, masks)
        torch_checked = True
    used = int(sum(int(x.sum()) for x in masks[-1]))
    return Report(m.name, steps, used, traces, torch_checked)


# -- the pieces ------------------------------------------------------------------------------


def _check_interface(m: Any) -> None:
    if not isinstance(m, _methods.Method):
        missing = [a for a in ("name", "budget", "needs_params", "frozen_after", "k_max", "init", "update")
                   if not hasattr(m, a)]
        raise ConformanceError(f"{m!r} is not a Method: it lacks {', '.join(missing)}.")
    types = {
        "name": (str,), "budget": (int, type(None)), "needs_params": (bool,),
        "frozen_after": (int, type(None)), "k_max": (int, type(None)),
    }
    for attr, ok in types.items():
        value = getattr(m, attr)
        if not isinstance(value, ok) or (attr != "needs_params" and isinstance(value, bool)):
            raise ConformanceError(
                f"{attr} must be {' or '.join(t.__name__ for t in ok)}, got {value!r}."
            )
    # A method opts into leafwise selection with ``leafwise = True`` (LeafwiseMethod).
    if getattr(m, "leafwise", False) is True:
        if not isinstance(m, _methods.LeafwiseMethod):
            missing = [a for a in ("effective_budget", "score", "increment")
                       if not callable(getattr(m, a, None))]
            raise ConformanceError(
                f"{m!r} declares leafwise = True but lacks {', '.join(missing)} (see "
                "optax_selective.methods.LeafwiseMethod)."
            )
        if m.k_max is None or m.budget is None:
            raise ConformanceError(
                "a LeafwiseMethod needs an int k_max and an int budget, got "
                f"k_max={m.k_max!r}, budget={m.budget!r}."
            )


def _run_jax(m, params, grads, *, compact: bool):
    tx = selective(m, inner=optax.sgd(LR), compact=compact)
    traces = [0]

    def step(params, state, g):
        traces[0] += 1
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step)
    state = tx.init(params)
    masks = [[np.asarray(x) for x in jax.tree.leaves(state.mask)]]
    for g in grads:
        params, state = step(params, state, g)
        masks.append([np.asarray(x) for x in jax.tree.leaves(state.mask)])
    return masks, traces[0], params


def _check_masks(m, masks, leaves) -> None:
    del leaves
    for t, mk in enumerate(masks):
        used = int(sum(int(x.sum()) for x in mk))
        if m.budget is not None and used > m.budget:
            raise ConformanceError(f"after {t} updates the mask holds {used} entries, over the budget of {m.budget}.")
        if t == 0:
            continue
        prev = masks[t - 1]
        if any((p & ~c).any() for p, c in zip(prev, mk)):
            raise ConformanceError(f"update {t - 1} removed entries from the mask; masks may only grow.")
        added = int(sum(int((c & ~p).sum()) for p, c in zip(prev, mk)))
        if m.k_max is not None and added > m.k_max:
            raise ConformanceError(f"update {t - 1} added {added} entries, over k_max={m.k_max}.")
        if m.frozen_after is not None and t - 1 >= m.frozen_after and added:
            raise ConformanceError(
                f"update {t - 1} added {added} entries but frozen_after={m.frozen_after}."
            )


def _check_update_directly(m, params, grads) -> None:
    """``report_added`` changes nothing but the extra output, which lists the new entries."""
    leaves = jax.tree.leaves(params)
    layout = make_layout(params, None)
    mask, state = m.init(leaves, layout)
    selectable = list(layout.selectable)
    for t, g in enumerate(grads):
        g = jax.tree.leaves(g)
        count = jnp.int32(t)
        plain, _ = m.update(list(mask), state, count, g, leaves, selectable)
        new, state, added = m.update(list(mask), state, count, g, leaves, selectable, report_added=True)
        _same([plain], [new], f"update {t}: report_added=True changed the mask")
        if added is not None:
            leaf, index, valid = (np.asarray(a) for a in added)
            for i, (old, cur) in enumerate(zip(mask, new)):
                want = np.flatnonzero(np.asarray(cur).reshape(-1) & ~np.asarray(old).reshape(-1))
                got = np.sort(index[valid & (leaf == i)])
                if not np.array_equal(want, got):
                    raise ConformanceError(
                        f"update {t}: leaf {i} gained entries {want.tolist()} but update reported "
                        f"{got.tolist()}."
                    )
        mask = new


def _check_torch(name, kwargs, m, leaves, grads, treedef, want) -> None:
    import torch

    from torch_bridge.jax_interop import MethodRunner
    from torch_bridge.optimizer import get_selective_optimizer

    params = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in leaves]
    if name is not None:
        opt = get_selective_optimizer(torch.optim.SGD, name)(params, lr=LR, **kwargs)
        got = [[np.asarray(x.numpy()) for x in opt.get_masks()]]
        for g in grads:
            for p, x in zip(params, jax.tree.leaves(g)):
                p.grad = torch.from_numpy(np.array(x))
            opt.step()
            got.append([np.asarray(x.numpy()) for x in opt.get_masks()])
    else:  # a method object only: drive it through the bridge's runner, as the optimizer does
        from optax_selective._tree import LeafLayout

        layout = LeafLayout(
            tuple(map(str, range(len(params)))), tuple(tuple(p.shape) for p in params),
            (True,) * len(params), (False,) * len(params),
        )
        runner = MethodRunner(m, layout, params)
        masks = runner.init(params)
        got = [[x.numpy().copy() for x in masks]]
        with torch.no_grad():
            for t, g in enumerate(grads):
                gs = [torch.from_numpy(np.array(x)) for x in jax.tree.leaves(g)]
                if m.frozen_after is None or t < m.frozen_after:
                    new = runner.update(t, range(len(params)), masks, gs, params)
                    masks = [new[i] for i in range(len(params))]
                for p, x, mk in zip(params, gs, masks):
                    p.add_(torch.where(mk, x, torch.zeros((), dtype=x.dtype)), alpha=-LR)
                got.append([x.numpy().copy() for x in masks])
        if runner.traces > 1:
            raise ConformanceError(f"the torch bridge traced the update {runner.traces} times.")
    _same(got, want, "torch and JAX select different entries")


def _check_torch_leafwise(name, kwargs, leaves, grads, want) -> None:
    """The torch bridge's leafwise selection (``stream_grads=True`` always takes it) selects
    the entries JAX selects: ``score`` and ``increment`` are the rule ``update`` follows."""
    import torch

    from torch_bridge.optimizer import get_selective_optimizer

    params = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in leaves]
    opt = get_selective_optimizer(torch.optim.SGD, name)(
        params, lr=LR, stream_grads=True, **kwargs)
    got = [[np.asarray(x.numpy()) for x in opt.get_masks()]]
    for g in grads:
        opt.zero_grad()
        # d/dp sum(p * g) is g exactly: backward hands the check's gradients to the hooks
        sum((p * torch.from_numpy(np.array(x))).sum()
            for p, x in zip(params, jax.tree.leaves(g))).backward()
        opt.step()
        got.append([np.asarray(x.numpy()) for x in opt.get_masks()])
    _same(got, want, "the torch bridge's leafwise selection (score, increment and "
          "effective_budget of the LeafwiseMethod) and update select different entries")


def _same(got, want, what: str) -> None:
    for t, (a, b) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(a, b)):
            if not np.array_equal(np.asarray(x), np.asarray(y)):
                raise ConformanceError(f"{what} (after {t} updates, leaf {i}).")
