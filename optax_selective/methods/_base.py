"""The method interface, and the budget rules the built-in methods share.

A method works on flat lists of leaves (leaf order), so the optax transform and the torch
bridge drive it the same way. :class:`Method` is everything a caller may use; a method that
also provides :class:`ShardedMethod`'s two hooks runs on parameters sharded over
``torch.distributed`` ranks (FSDP2) too, and one that declares :class:`LeafwiseMethod`
(``leafwise = True`` and its three members) lets the torch bridge's compact state select one
parameter at a time. Callers never look for other attributes and never compare method names:
what differs between methods is stated here.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from optax_selective._tree import LeafLayout

Leaves = list[jax.Array]
MAX_BUDGET = 2**31 - 1
# The entries one update added, as ``k_max`` slots ``(leaf, index, valid)`` of int32, int32
# and bool arrays: slot ``j`` names entry ``index[j]`` (flat, row-major) of leaf ``leaf[j]``
# if ``valid[j]`` (what ``selection.top_k_indices`` returns).
Added = tuple[jax.Array, jax.Array, jax.Array]


@runtime_checkable
class Method(Protocol):
    """What every selection method provides (the built-ins are frozen dataclasses).

    Attributes:
      name: the name it is registered under (:func:`optax_selective.methods.register`);
        summaries and torch state dicts record it.
      budget: the most entries ever selected, choose_all leaves included, as a Python int;
        ``None`` for a method that selects every eligible entry (full fine-tuning), which
        then gets no compact (O(budget)) inner state.
      needs_params: whether ``update`` reads the current parameters.
      frozen_after: ``update`` is the identity once ``count >= frozen_after`` (0 for masks
        fixed at init, ``None`` if the mask may change at any step); callers skip the call.
      k_max: a static bound on the entries one ``update`` adds (``None``: up to the budget);
        callers that must find the new entries by comparing masks look at no more.

    Example:
      >>> from optax_selective import methods
      >>> method = methods.build("id3", budget=10, max_steps=5)
      >>> isinstance(method, methods.Method)
      True
      >>> method.name, method.budget, method.needs_params, method.frozen_after, method.k_max
      ('id3', 10, True, 5, 2)
    """

    name: str
    budget: int | None
    needs_params: bool
    frozen_after: int | None
    k_max: int | None

    def init(self, params: Sequence[jax.Array | None], layout: LeafLayout) -> tuple[Leaves, Any]:
        """The first mask (one bool array per leaf, choose_all leaves all true) and the
        method's own state (a pytree of arrays, e.g. a NamedTuple; ``()`` if none).

        ``params`` holds the parameters in leaf order (the torch bridge passes ``None`` for
        leaves that take no part); ``layout`` their static shapes and roles.
        """
        ...

    def update(
        self,
        mask: Leaves,
        state: Any,
        count: jax.Array,
        grads: Sequence[jax.Array | None],
        params: Sequence[jax.Array] | None,
        selectable: Sequence[bool],
        *,
        report_added: bool = False,
    ) -> tuple[Leaves, Any] | tuple[Leaves, Any, Added | None]:
        """The mask after one more step (``count`` steps so far), traceable by ``jax.jit``.

        Masks only grow and never exceed ``budget``. ``selectable[i]`` is false for leaves
        that take no part in this step (their ``grads`` entry may be ``None``; keep their
        mask). With ``report_added=True`` it returns ``(mask, state, added)``: the entries
        this step added as :data:`Added` slots, or ``None`` when the method does not know
        them without a pass over the masks (the caller then compares old and new masks).
        """
        ...


class ShardInit(NamedTuple):
    """The first mask of a :class:`ShardedMethod`, stated so that shards can build it.

    Besides the choose_all leaves, the mask holds the first ``leading[i]`` entries
    (row-major) of each leaf ``i``, and the ``k`` entries with the highest ``scores`` over
    all leaves together (ties to the lower global index; ``scores[i]`` is ``None`` for a
    leaf that takes no part, and is shaped like this shard of leaf ``i`` otherwise).

    Example:
      >>> from optax_selective.methods import LeafLayout
      >>> from optax_selective.methods import BitFit
      >>> layout = LeafLayout(("b1", "b2"), ((3,), (2,)), (True, True), (False, False))
      >>> BitFit(budget=4).shard_init([None, None], [0, 0], layout)  # b1 whole, b2's first
      ShardInit(state=(), leading=[3, 1], scores=None, k=0)
    """

    state: Any
    leading: list[int]
    scores: list[jax.Array | None] | None = None
    k: int = 0


@runtime_checkable
class ShardedMethod(Method, Protocol):
    """What a method adds to run on sharded parameters (``torch_bridge.distributed``).

    Each rank holds a contiguous row-major part (a *shard*) of every leaf. The method states
    its rule as elementwise scores on the shards and a global top-k, which the runner
    computes by exchanging candidates only, so no rank ever holds a whole leaf.

    Example:
      >>> from optax_selective import methods
      >>> all(isinstance(methods.build(n, **a), methods.ShardedMethod) for n, a in [
      ...     ("id3", {"budget": 4, "max_steps": 2}), ("pafi", {"budget": 4}), ("fft", {})])
      True
    """

    def shard_init(
        self, shards: Sequence[jax.Array | None], starts: Sequence[int], layout: LeafLayout
    ) -> ShardInit:
        """The first mask from this rank's shards: ``shards[i]`` is its part of leaf ``i``
        (``None`` for leaves that take no part), beginning at flat index ``starts[i]`` of the
        leaf; ``layout`` describes the whole (unsharded) leaves."""
        ...

    def shard_update(
        self,
        state: Any,
        count: int,
        grads: Sequence[jax.Array | None],
        params: Sequence[jax.Array | None],
        masks: Sequence[jax.Array | None],
    ) -> tuple[list[jax.Array | None] | None, int, Any]:
        """One step on this rank's shards (``None``: the leaf takes no part):
        ``(scores, k, state)``, where the ``k`` highest ``scores`` over all leaves and ranks
        join the mask (at most ``k_max``, or ``budget`` if that is ``None``), or
        ``scores is None`` if nothing joins this step."""
        ...


@runtime_checkable
class LeafwiseMethod(Method, Protocol):
    """A method whose every step is one global top-k of an elementwise score, declared so.

    Such a method can be run one parameter (or one chunk of a parameter) at a time, with no
    whole-model score or mask: the torch bridge's compact state does this for large models
    and with ``stream_grads=True`` (:mod:`torch_bridge.leafwise`); other methods are always
    given the whole model at once (the default). ID3 is one. Declaring it is a promise that
    the method's ``init`` and ``update`` are exactly this rule:

    * ``init`` selects the choose_all leaves only, after the checks of
      :meth:`effective_budget`, and the method's state holds nothing but that budget;
    * while ``count < frozen_after`` (for ever if ``None``), ``update`` adds the
      ``increment(count, effective_budget(layout))`` entries with the highest ``score``
      over all selectable leaves together (ties to the lower global index: leaf order, then
      row-major; non-finite scores never chosen, so fewer may join), and nothing else.

    Attributes:
      leafwise: ``True`` to declare the rule (a method that sets ``False``, or lacks the
        members below, is run whole-model).
      k_max: a static bound on :meth:`increment` (an int, not ``None``).

    Example:
      >>> from optax_selective.methods import ID3, LeafwiseMethod, PaFI
      >>> isinstance(ID3(budget=4, max_steps=2), LeafwiseMethod)  # ID3 declares the rule
      True
      >>> getattr(PaFI(budget=4), "leafwise", False)  # PaFI is given the whole model
      False
    """

    leafwise: bool
    k_max: int

    def effective_budget(self, layout: LeafLayout) -> int:
        """The entries selected outside the choose_all leaves, as a Python int, after the
        same checks (and errors) as ``init``."""
        ...

    def score(self, grad: jax.Array, param: jax.Array, mask: jax.Array | bool) -> jax.Array:
        """Elementwise score of each entry (float32, higher is chosen first), traceable.

        Entries where ``mask`` is true are already selected and must score -inf; an entry's
        score depends on its own ``grad``, ``param`` and ``mask`` only, and a NaN gradient
        gives a non-finite score (the leafwise path excludes selected entries that way,
        calling ``score(grad, param, False)``).
        """
        ...

    def increment(self, count: jax.Array, effective_budget: jax.Array) -> jax.Array:
        """The entries to add at update ``count`` (int32 scalars in and out, traceable),
        at most ``k_max``."""
        ...


@runtime_checkable
class LeafwiseInitMethod(Method, Protocol):
    """A method whose mask is fixed at init as one global top-k of an elementwise score of
    the parameters, declared so.

    The torch bridge's compact state then chooses that mask one parameter (or chunk) at a time,
    never holding a whole-model score array (:func:`torch_bridge.leafwise.choose_fixed_mask`),
    with streaming or for models of at least one chunk. PaFI is one. Declaring it is a promise
    that ``init`` selects the choose_all leaves plus the ``effective_budget(layout)`` entries
    with the highest ``score`` over all selectable leaves together (ties to the lower global
    index: leaf order, then row-major; non-finite scores never chosen), and that ``update``
    never adds an entry (``frozen_after == 0``).

    Attributes:
      leafwise_init: ``True`` to declare the rule (a method that sets ``False``, or lacks the
        members below, is given the whole model at init).

    Example:
      >>> from optax_selective.methods import ID3, LeafwiseInitMethod, PaFI
      >>> isinstance(PaFI(budget=4), LeafwiseInitMethod)  # PaFI declares the rule
      True
      >>> isinstance(ID3(budget=4, max_steps=2), LeafwiseInitMethod)
      False
    """

    leafwise_init: bool

    def effective_budget(self, layout: LeafLayout) -> int:
        """The entries selected outside the choose_all leaves, as a Python int, after the
        same checks (and errors) as ``init``."""
        ...

    def score(self, param: jax.Array) -> jax.Array:
        """Elementwise score of each entry of ``param`` (float32, higher is chosen first),
        traceable; an entry's score depends on its own value only."""
        ...


def check_int(name: str, value: Any, minimum: int, maximum: int = MAX_BUDGET) -> int:
    """Validates an int argument at construction and returns it as a Python int.

    Example:
      >>> from optax_selective.methods import check_int
      >>> check_int("max_steps", 3, 1)
      3
      >>> check_int("max_steps", 0, 1)
      Traceback (most recent call last):
      ...
      ValueError: max_steps must be in [1, 2147483647], got 0.
    """
    traced = isinstance(value, jax.core.Tracer)
    if traced or isinstance(value, bool) or not hasattr(value, "__index__"):
        hint = ""
        if traced:  # most likely optax.inject_hyperparams turned it into a traced array
            hint = f" (With optax.inject_hyperparams, add {name!r} to static_args.)"
        raise TypeError(
            f"{name} must be an int, got {value!r} of type {type(value).__name__}.{hint}"
        )
    value = operator.index(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}.")
    return value


def check_budget(budget: Any) -> int:
    """Validates a budget: a positive int that fits the int32 step arithmetic."""
    return check_int("budget", budget, 1)


def effective_budget(method: str, budget: int, layout: LeafLayout, *, at_least: int) -> int:
    """``B_eff = budget - |choose_all|``, checked against the parameters (DESIGN.md section 2)."""
    total = layout.num_choose_all + layout.num_selectable
    if total == 0:
        raise ValueError(
            f"{method}: params has no floating-point leaves, so there is nothing to select."
        )
    b_eff = budget - layout.num_choose_all
    if b_eff < at_least:
        raise ValueError(
            f"{method}: the choose_all leaves hold {layout.num_choose_all} entries but budget is "
            f"{budget}, leaving {b_eff} for selection (needs >= {at_least}). Raise the budget "
            "or choose fewer leaves with choose_all."
        )
    return b_eff


def check_not_full(method: str, budget: int, layout: LeafLayout) -> None:
    """Refuses a budget above the eligible entries (that would be full fine-tuning)."""
    total = layout.num_choose_all + layout.num_selectable
    if total == 0:
        raise ValueError(f"{method}: params has no floating-point leaves, so there is nothing to select.")
    if budget > total:
        raise ValueError(
            f"{method}: budget {budget} is larger than the {total} eligible (floating-point) "
            "entries of params; that is full fine-tuning, use selective_fft() instead."
        )


def choose_all_mask(layout: LeafLayout) -> Leaves:
    """The starting mask: choose_all leaves fully selected, every other leaf empty.

    Example:
      >>> from optax_selective.methods import LeafLayout
      >>> from optax_selective.methods import choose_all_mask
      >>> layout = LeafLayout(("b", "w"), ((2,), (2, 2)), (False, True), (True, False))
      >>> [m.tolist() for m in choose_all_mask(layout)]
      [[True, True], [[False, False], [False, False]]]
    """
    return [jnp.full(shape, c, dtype=bool) for shape, c in zip(layout.shapes, layout.choose_all)]


def frozen_update(mask, state, count, grads, params, selectable, *, report_added=False):
    """``update`` for masks fixed at init: nothing changes."""
    del count, grads, params, selectable
    return (mask, state, None) if report_added else (mask, state)


@dataclasses.dataclass(frozen=True)
class SpendSchedule:
    """Static facts a method's state carries for the under-used budget check.

    ``budget`` is the method's budget (choose_all included); ``steps`` the updates over which
    it is spent (ID3's ``max_steps``, FISH's ``fish_steps``). Registered as a pytree node
    with no leaves, so it adds nothing to checkpoints (states saved before it existed
    restore into targets that have it) and is static under ``jax.jit``.
    """

    budget: int
    steps: int


def register_with_schedule(state_type: type) -> type:
    """Registers a method's state NamedTuple whose last field is a ``SpendSchedule``.

    The schedule goes into the tree definition (static under ``jax.jit``), not the leaves, and
    the other fields keep their namedtuple key paths: checkpoints hold exactly the arrays
    they held before the field existed, and restore into states that have it.
    """
    names = state_type._fields[:-1]
    keys = tuple(jax.tree_util.GetAttrKey(n) for n in names)

    def flatten_with_keys(state):
        return tuple(zip(keys, state[:-1])), state[-1]

    def unflatten(schedule, children):
        return state_type(*children, schedule)

    jax.tree_util.register_pytree_with_keys(
        state_type, flatten_with_keys, unflatten, flatten_func=lambda s: (tuple(s[:-1]), s[-1])
    )
    return state_type


# -- argument checks shared by the registered factories ------------------------------------


def require(method: str, arg: str, value: Any, what: str) -> Any:
    """``value``, or a ValueError naming the missing argument if it is ``None``.

    Example:
      >>> from optax_selective.methods import require
      >>> require("fish", "fish_steps", 3, "number of scoring steps")
      3
      >>> require("fish", "fish_steps", None, "number of scoring steps")
      Traceback (most recent call last):
      ...
      ValueError: method 'fish' needs fish_steps=<number of scoring steps>, got None.
    """
    if value is None:
        raise ValueError(f"method {method!r} needs {arg}=<{what}>, got None.")
    return value


def required_budget(method: str, budget: Any) -> int:
    """A required, valid budget (see :func:`check_budget`).

    Example:
      >>> from optax_selective.methods import required_budget
      >>> required_budget("pafi", 5)
      5
      >>> required_budget("pafi", None)
      Traceback (most recent call last):
      ...
      ValueError: method 'pafi' needs budget=<entries that may change>, got None.
    """
    return check_budget(require(method, "budget", budget, "entries that may change"))


def check_nonnegative_number(method: str, arg: str, value: Any) -> Any:
    """A number ``>= 0`` as a Python float; a JAX array (e.g. traced by
    ``optax.inject_hyperparams``) passes unchecked.

    Example:
      >>> from optax_selective.methods import check_nonnegative_number
      >>> check_nonnegative_number("my_method", "eps", 0)
      0.0
      >>> check_nonnegative_number("my_method", "eps", -1.0)
      Traceback (most recent call last):
      ...
      ValueError: eps must be >= 0, got -1.0.
    """
    if isinstance(value, jax.Array):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{method}: {arg} must be a number, got {value!r}.")
    if value < 0:
        raise ValueError(f"{arg} must be >= 0, got {value}.")
    return float(value)
