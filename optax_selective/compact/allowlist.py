"""Which inner optimizers compact state runs exactly: the allow-list and the numeric probe.

This is exact for *elementwise* inner transformations (an entry's update depends on its own
gradient, parameter and state and on shared scalars: count, hyperparameters) and for those
that read a global statistic of the gradient that zero entries leave unchanged (the global
norm of ``clip_by_global_norm``, the finiteness test of ``apply_if_finite`` and of
``MultiSteps``' optax skip rules): the gathered selected entries give the same value as the
masked full gradient. :func:`compact_refusal` decides with an allow-list of optax's own
building blocks, recognised by the code of the functions their factories return (so a user
function that happens to be called ``scale`` is not mistaken for optax's), walking through
``chain``, ``named_chain``, ``with_extra_args_support``, ``apply_if_finite``,
``MultiSteps`` and ``inject_hyperparams``; then a numeric probe (the same entries must get
the same updates alone and embedded among unselected ones: zero gradient, nonzero values).
Everything else (``masked``, ``multi_transform``, factored or shape-aware optimizers such as
Adafactor, Muon or Shampoo, and any user-defined transformation) is refused with an error
that points to ``compact=False``. :func:`register_elementwise` extends the allow-list.
``tests/test_compact_inner_allowlist.py`` pins this against the installed optax: a new
optax release that changes these closures makes those tests fail rather than the check
accept something silently (the check itself refuses what it does not recognise).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The allow-list is keyed by the *code objects* of the init / update functions that optax's
# own factories return (every call of a factory returns closures over the same code), found
# by calling each factory once: a user function that happens to be called ``scale`` or
# ``clip`` is not on it, and a renamed private optax helper still is. Kinds:
#   "leaf":    elementwise in the gradient / params / state, with state that stays the same
#              function of the step count while the gradient is zero;
#   "global":  reads a global statistic of the whole gradient that zero entries do not change
#              (the global norm, finiteness), so the gathered selected entries give it exactly;
#   "wrapper": combines inner transformations (walked through).
_ELEMENTWISE: set[str] = set()  # names added with register_elementwise (user factories)
_KNOWN: dict[Any, str] | None = None
_INJECT = "inject"


def _known_codes() -> dict[Any, str]:
    global _KNOWN
    if _KNOWN is None:
        leaf = [
            optax.identity(),
            optax.scale(1.0),
            optax.scale_by_schedule(lambda count: 1.0),
            optax.scale_by_adam(),
            optax.scale_by_adamax(),
            optax.scale_by_amsgrad(),
            optax.scale_by_lion(),
            optax.scale_by_rms(),
            optax.scale_by_stddev(),
            optax.scale_by_rss(),
            optax.trace(0.9),
            optax.add_decayed_weights(0.1),
            optax.clip(1.0),
        ]
        glob = [optax.clip_by_global_norm(1.0)]
        wrap = [
            optax.chain(optax.identity()),
            optax.named_chain(("a", optax.identity())),
            optax.with_extra_args_support(optax.GradientTransformation(*optax.identity())),
            optax.apply_if_finite(optax.identity(), 1),
        ]
        known: dict[Any, str] = {}
        for kind, txs in (("leaf", leaf), ("global", glob), ("wrapper", wrap)):
            for tx in txs:
                for fn in (tx.init, tx.update):
                    code = getattr(fn, "__code__", None)
                    if code is not None and code not in known:
                        known[code] = kind
        inject = optax.inject_hyperparams(optax.scale)(step_size=1.0)
        known.setdefault(inject.init.__code__, _INJECT)
        known.setdefault(inject.update.__code__, _INJECT)
        _KNOWN = known
    return _KNOWN


_UNREADABLE = object()


def register_elementwise(name: str) -> None:
    """Allows compact state for transformations built by *your* factory called ``name``.

    ``name`` is the factory's ``__qualname__`` (e.g. ``"scale_by_my_rule"`` for functions
    ``scale_by_my_rule.<locals>.update_fn``). Only do this for transformations whose update
    of each entry depends on that entry's gradient, parameter and state alone. The numeric
    probe still runs. optax's own elementwise transformations need no registration.

    Example:
      >>> from optax_selective import compact
      >>> compact.register_elementwise("scale_by_my_rule")
    """
    _ELEMENTWISE.add(name)


def _head(fn) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__).split(".<locals>")[0]


def _cells(fn):
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, optax.GradientTransformation):
                yield v.init
                yield v.update
            elif callable(v) and not isinstance(v, type):
                yield v


def _walk(fn, seen) -> str | None:
    """Reason the transformation behind ``fn`` is not known to be exact on compact state."""
    if id(fn) in seen:
        return None
    seen.add(id(fn))
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, optax.MultiSteps):
        return _walk_multisteps(owner, seen)
    kind = _known_codes().get(getattr(fn, "__code__", None))
    if kind in ("leaf", "global"):
        return None
    if kind == "wrapper":
        for sub in _cells(fn):
            reason = _walk(sub, seen)
            if reason:
                return reason
        return None
    if kind == _INJECT:
        return _walk_inject(fn, seen)
    if _head(fn) in _ELEMENTWISE:
        return None  # registered by the user
    return f"{getattr(fn, '__module__', '') or ''}.{_head(fn)}"


def _walk_multisteps(ms: optax.MultiSteps, seen) -> str | None:
    """MultiSteps accumulates gradients entry by entry; its skip rule must be optax's own
    (finiteness or the global norm, which zero entries do not change)."""
    skip = getattr(ms, "_should_skip_update_fn", _UNREADABLE)  # no public accessor
    if skip is _UNREADABLE:
        return "optax.MultiSteps (this optax version hides its skip rule)"
    skip = getattr(skip, "func", skip)  # functools.partial(skip_large_updates, ...)
    default = getattr(optax.MultiSteps(optax.identity(), 1), "_should_skip_update_fn", None)
    known = (optax.skip_not_finite, optax.skip_large_updates)
    if skip is not None and not (
        any(skip is f for f in known) or getattr(skip, "__code__", 0) is getattr(default, "__code__", 1)
    ):
        return f"optax.MultiSteps(should_skip_update_fn={_head(skip)})"
    inner = ms.inner_opt
    return _walk(inner.init, seen) or _walk(inner.update, seen)


def _walk_inject(fn, seen) -> str | None:
    cells = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            cells[name] = cell.cell_contents
        except ValueError:
            pass
    factory = cells.get("inner_factory")
    if factory is None:
        return "optax.inject_hyperparams (unrecognised closure)"
    if "numeric_hps" not in cells:
        return None  # update_fn: the values live in init_fn's closure, which is checked too
    kwargs = dict(cells.get("other_hps", {}))
    kwargs.update(cells.get("numeric_hps", {}))
    kwargs.update({k: 1e-3 for k in cells.get("sched_hps", {})})
    try:
        tx = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - report, do not crash the check
        return f"inject_hyperparams({_head(factory)}) could not be rebuilt: {e}"
    return _walk(tx.init, seen) or _walk(tx.update, seen)


def _probe(inner: optax.GradientTransformation) -> str | None:
    """Same entries alone and embedded among unselected ones (zero gradient, nonzero values)
    must get the same updates (3 steps)."""
    tx = optax.with_extra_args_support(inner)
    rng = np.random.default_rng(0)
    n, extra = 5, 4
    place = np.array([1, 2, 4, 6, 7])
    with jax.ensure_compile_time_eval():
        p_small = jnp.asarray(rng.normal(size=n), jnp.float32)
        p_big = jnp.asarray(rng.normal(size=n + extra), jnp.float32).at[place].set(p_small)
        s_small, s_big = tx.init((p_small,)), tx.init((p_big,))
        for _ in range(3):
            g_small = jnp.asarray(rng.normal(size=n), jnp.float32)
            # the other entries are unselected: zero gradient, any value
            g_big = jnp.zeros(n + extra, jnp.float32).at[place].set(g_small)
            (u_small,), s_small = tx.update((g_small,), s_small, (p_small,))
            (u_big,), s_big = tx.update((g_big,), s_big, (p_big,))
            if not np.allclose(np.asarray(u_small), np.asarray(u_big)[place], rtol=1e-5, atol=1e-7):
                return "numeric probe: an entry's update depends on other entries"
    return None


def compact_refusal(inner: optax.GradientTransformation) -> str | None:
    """Why ``inner`` cannot run on compact state exactly, or None if it can.

    Example:
      >>> import optax
      >>> from optax_selective import compact
      >>> compact.compact_refusal(optax.adam(1e-3)) is None
      True
      >>> "allow-list" in compact.compact_refusal(optax.adafactor(1e-3))
      True
    """
    seen: set[int] = set()
    reason = _walk(inner.init, seen) or _walk(inner.update, seen)
    if reason:
        return f"{reason} is not on the allow-list of elementwise transformations"
    try:
        return _probe(inner)
    except Exception as e:  # noqa: BLE001
        return f"numeric probe failed: {type(e).__name__}: {e}"


def check_compact_inner(inner: optax.GradientTransformation) -> None:
    """Raises ``ValueError`` if ``inner`` cannot run on compact state exactly.

    Example:
      >>> import optax
      >>> from optax_selective import compact
      >>> compact.check_compact_inner(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)))
    """
    reason = compact_refusal(inner)
    if reason:
        raise ValueError(
            f"compact=True (the default of the wrapper form) needs an elementwise inner "
            f"optimizer, but {reason}. Pass compact=False to keep the inner optimizer's state "
            "dense (full size, exact for any optimizer), or use an elementwise optimizer "
            "(sgd, momentum, adam, adamw without mask, adagrad, rmsprop, lion, adamax, "
            "amsgrad), optionally inside chain / inject_hyperparams / apply_if_finite / "
            "MultiSteps and after clip_by_global_norm."
        )

