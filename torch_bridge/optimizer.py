"""``get_selective_optimizer``: any ``torch.optim.Optimizer`` class, made selective.

The returned class subclasses the given optimizer class (so LR schedulers, ``Trainer``,
``accelerate`` and ``state_dict`` see a real optimizer) and adds, around its ``step``:

1. while the method's mask may still change (ID3's first ``max_steps`` steps, FISH's first
   ``fish_steps``), one call of the shared ``optax_selective`` method through
   :mod:`torch_bridge.jax_interop`;
2. the gradient is set to exact ``+0.0`` outside the mask (parameters whose mask is empty for
   good get ``grad = None``, so the inner optimizer skips them);
3. the inner optimizer's own ``step``;
4. unselected entries are restored where the inner step could have moved them (weight decay,
   ``maximize``, optimizers outside ``torch.optim``; see :mod:`torch_bridge.safety`), so they
   stay bit-identical whatever the inner optimizer does.

With ``compact=True`` steps 2-4 are replaced by :mod:`torch_bridge.compact`: the inner step
runs on flat buffers that hold the selected entries only, so the inner optimizer's state is
O(budget) and unselected entries never reach it.

Leaf order is ``param_groups`` in order, then the params of each group. Params with
``requires_grad=False`` at construction, non-floating-point params, and params without a
gradient in a step are never selected in that step and never changed.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from optax_selective.inspect import BudgetShortfallWarning, budget_shortfall_message
from optax_selective.methods import LeafLayout, LeafwiseInitMethod, LeafwiseMethod
from optax_selective.methods import arguments as _method_arguments
from torch_bridge import distributed as _dist
from torch_bridge import names as _names
from torch_bridge import summary as _summary
from torch_bridge import verify as _verify
from torch_bridge.compact import CompactState, compact_refusal
from torch_bridge.distributed import ShardedMethodRunner, is_sharded
from torch_bridge.jax_interop import MethodRunner
from torch_bridge.leafwise import LeafwiseSelector, choose_fixed_mask, step_size
from torch_bridge.methods import LEGACY_ARGS, build_method, check_method_name, split_kwargs
from torch_bridge.row_grads import block_rows, set_row_sink
from torch_bridge.safety import restore_scope
from torch_bridge.state_check import check_state, legacy_state_message

# Without streaming, compact selection runs one parameter (chunk) at a time only from this many
# selectable entries up: below it the one whole-model program per step is faster (leafwise
# selection has a fixed cost per parameter and chunk: 1.7x a dense AdamW step at 25M) and its
# temporaries (a few bytes per entry) are small; above it they reach gigabytes at LLM sizes.
LEAFWISE_MIN = 2**26

FULL, EMPTY, PARTIAL = "full", "empty", "partial"
STATE_KEY = "selective"
_CLASSES: dict[tuple[type, str], type] = {}


def get_selective_optimizer(optimizer_class: type, peft_to_use: str) -> type:
    """Returns ``optimizer_class`` made selective with the method ``peft_to_use``.

    Args:
      optimizer_class: a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.AdamW``.
      peft_to_use: ``"id3"``, ``"pafi"``, ``"bitfit"``, ``"fish"``, ``"random"``, ``"fft"``
        (full fine-tuning), or a name registered with ``optax_selective.methods.register``
        (``docs/guides/custom-methods.md``): then the constructor's keyword arguments that
        its factory names go to it.

    Returns:
      A subclass of ``optimizer_class`` (the same class for the same arguments). Its
      constructor takes ``params`` (tensors or param groups; a group with
      ``"choose_all": True`` is fully trainable from step 0 and counts toward the budget), the
      usual keyword arguments of ``optimizer_class``, and:

      * ``budget``: the most entries that may ever change (required except for ``"fft"``);
      * ``max_steps``: optimizer steps over which ID3 spends the budget (required for id3,
        ignored by the others);
      * ``fish_steps``: steps whose squared gradients make up FISH's Fisher score (required for
        fish); the mask is fixed at step ``fish_steps - 1``, and until then only choose_all
        groups train;
      * ``seed`` (default 0): int in ``[0, 2**32)`` for the random mask; the same seed selects
        the same entries as ``optax_selective.selective_random`` on the same shapes;
      * ``exp`` (default 1.0), ``eps`` (default 1e-8): ID3's score
        ``|g| / (|θ| + eps) ** exp``. As in selective-optimizers 0.4, ``eps`` belongs to ID3
        when the method is id3 and is passed to the inner optimizer otherwise;
      * ``verify`` (default False): keep a host copy of the parameters and check in
        :meth:`post_train_work` that the budget held and nothing unselected moved.
      * the inner optimizer's own arguments are honoured, ``weight_decay`` included (it acts
        on the selected entries only; selective-optimizers 0.4 forced it to 0). A nonzero
        default such as AdamW's 0.01 is announced with a warning unless ``weight_decay`` is
        passed.
      * ``compact`` (default None: True where exact, else False): keep the inner optimizer's
        state for the selected entries only (:mod:`torch_bridge.compact`), so optimizer memory
        is O(budget) (no per-entry masks are kept once the method's mask is fixed; ID3, and
        any method that declares ``optax_selective.methods.LeafwiseMethod``, keeps none at
        all with ``stream_grads=True`` or on models of at least 2**26 selectable entries,
        where it selects one parameter at a time) and the inner step
        costs O(budget). It gives
        bit-identical parameters to the dense form (``compact=False``) for SGD, Adam, AdamW,
        Adagrad, RMSprop, Adamax, NAdam and RAdam without coupled weight decay, on unsharded
        parameters; ``compact=True`` raises for anything else, None falls back to dense.
        There (:mod:`torch_bridge.leafwise`) no whole-model score or mask copy is made.
      * ``stream_grads`` (default False): consume each parameter's gradient while
        ``backward`` runs (a ``register_post_accumulate_grad_hook`` per parameter): its values
        at the selected entries go into the compact buffers, ID3 keeps the parameter's best
        candidates for this step, and ``param.grad`` is set to None at once, so the dense
        gradients of the whole model never exist together. Needs the compact state. The
        parameters and selected entries equal those of ``stream_grads=False``. After
        ``backward``, ``param.grad`` is None for selectable parameters (choose_all ones keep
        theirs), so clip gradients and unscale with ``GradScaler`` are not available; FISH
        keeps dense gradients during its ``fish_steps``. Accumulating gradients over several
        ``backward`` calls works once the mask is fixed and raises while ID3 still selects;
        call ``zero_grad()`` on this optimizer (not only the model's) to discard gradients.
        Refused under multi-process data parallelism (DDP all-reduces after the hooks).

    Example:
      >>> import torch
      >>> model = torch.nn.Linear(4, 2)
      >>> cls = get_selective_optimizer(torch.optim.AdamW, "id3")
      >>> opt = cls(model.parameters(), lr=1e-2, weight_decay=0.01, budget=4, max_steps=2)
      >>> for _ in range(2):
      ...     opt.zero_grad(); model(torch.ones(3, 4)).sum().backward(); opt.step()
      >>> opt.get_budget_used()
      4
      >>> opt = cls(model.parameters(), lr=1e-2, weight_decay=0.0, budget=4, max_steps=2,
      ...           compact=True)
      >>> opt.state_nbytes() < 8 * sum(p.numel() for p in model.parameters())
      True
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(
            "optimizer_class must be a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW), "
            f"got {optimizer_class!r}."
        )
    if issubclass(optimizer_class, SelectiveOptimizer):
        raise TypeError(f"{optimizer_class.__name__} is already a selective optimizer.")
    name = check_method_name(peft_to_use)
    key = (optimizer_class, name)
    if key not in _CLASSES:
        cls_name = f"Selective{optimizer_class.__name__}"
        _CLASSES[key] = type(
            cls_name,
            (SelectiveOptimizer, optimizer_class),
            {"method_name": name, "inner_class": optimizer_class, "__module__": __name__,
             "__qualname__": cls_name},
        )
    return _CLASSES[key]


def _inner_step(optimizer_class: type) -> Callable[..., Any]:
    # torch wraps ``step`` of every instantiated optimizer class in a profiling hook that runs
    # the step hooks; our own ``step`` is wrapped already, so call the inner one unwrapped.
    step = optimizer_class.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


class SelectiveOptimizer(torch.optim.Optimizer):
    """Mixin placed before a torch optimizer class by :func:`get_selective_optimizer`.

    Every optimizer :func:`get_selective_optimizer` returns is an instance of both this class
    and its inner optimizer class; its constructor's arguments are described there.

    Example:
      >>> import torch, torch_bridge
      >>> model = torch.nn.Linear(2, 1)
      >>> with torch.no_grad():
      ...     _ = model.weight.copy_(torch.tensor([[0.5, -2.0]])), model.bias.fill_(1.0)
      >>> opt = torch_bridge.get_selective_optimizer(torch.optim.SGD, "pafi")(
      ...     model.parameters(), lr=0.1, budget=1)  # PaFI: the smallest |θ|, weight[0, 0]
      >>> isinstance(opt, torch_bridge.SelectiveOptimizer), isinstance(opt, torch.optim.SGD)
      (True, True)
      >>> model(torch.ones(1, 2)).sum().backward()
      >>> opt.step()
      >>> model.weight.detach(), model.bias.detach()  # only the selected entry moved
      (tensor([[ 0.4000, -2.0000]]), tensor([1.]))
    """

    method_name: str = ""
    inner_class: type = torch.optim.Optimizer

    def __init__(self, params: Any, *args: Any, **kwargs: Any):
        verify = kwargs.pop("verify", False)
        compact = kwargs.pop("compact", None)
        stream_grads = kwargs.pop("stream_grads", False)
        # The arguments the method's registered factory names (eps: ID3's when it takes it,
        # else the inner optimizer's, as in 0.4); the rest go to the inner optimizer.
        takes = _method_arguments(self.method_name)
        ignored = [k for k in LEGACY_ARGS if k in kwargs and k not in takes]
        method_args = split_kwargs(self.method_name, kwargs)
        if ignored:  # 0.4 accepted them for every method; say that they do nothing here
            warnings.warn(
                f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored by the "
                f"method {self.method_name!r}, which takes {', '.join(sorted(takes)) or 'none'}"
                f"; drop {'it' if len(ignored) == 1 else 'them'}.", UserWarning, stacklevel=2)
        _check_inner_kwargs(self.inner_class, kwargs, takes)
        if "initial_params_path" in kwargs:
            kwargs.pop("initial_params_path")
            warnings.warn(
                "initial_params_path is ignored: verification keeps its copy in memory.",
                DeprecationWarning,
                stacklevel=2,
            )
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be True or False, got {verify!r}.")
        if compact is not None and not isinstance(compact, bool):
            raise TypeError(f"compact must be True, False or None (auto), got {compact!r}.")
        if not isinstance(stream_grads, bool):
            raise TypeError(f"stream_grads must be True or False, got {stream_grads!r}.")
        if stream_grads and compact is False:
            raise ValueError(
                "stream_grads=True needs the compact state (the dense form steps on dense "
                "gradients); pass compact=True or leave compact unset."
            )
        method = build_method(self.method_name, **method_args)
        if not isinstance(params, torch.Tensor):
            params = list(params)  # read twice: for the announcement below, then by torch
        _announce_default_weight_decay(self.inner_class, params, args, kwargs)
        self._selective_ready = False
        super().__init__(params, *args, **kwargs)
        self._stream_requested = stream_grads  # read by _setup: streaming needs leafwise
        self._setup(method, verify, compact)
        self._streaming = False
        self._streamed: set[int] = set()
        self._accumulating: dict[int, bool] = {}  # per leaf: its row blocks add (row_grads)
        self._row_warned = False
        # clipping under streaming: each consumed gradient's 2-norm (row blocks: one per block)
        self._grad_norms: dict[int, list[torch.Tensor]] = {}
        self._norm_unknown: set[int] = set()  # parameters with several gradients this step
        self._clip_coef: torch.Tensor | None = None
        self._hooks: list[Any] = []
        if stream_grads:
            self._start_streaming()

    # -- set-up ------------------------------------------------------------------------------
    def _setup(self, method: Any, verify: bool, compact: bool | None) -> None:
        params, paths, groups, selectable, choose_all = [], [], [], [], []
        for gi, group in enumerate(self.param_groups):
            ca = group.get("choose_all", False)
            if not isinstance(ca, bool):
                raise TypeError(
                    f"param_groups[{gi}]['choose_all'] must be True or False, got {ca!r}."
                )
            for pi, p in enumerate(group["params"]):
                trainable = p.requires_grad and p.is_floating_point()
                params.append(p)
                paths.append(f"param_groups[{gi}]['params'][{pi}]")
                groups.append(gi)
                selectable.append(trainable and not ca)
                choose_all.append(trainable and ca)
        self._params: list[torch.Tensor] = params
        self._group_of: list[int] = groups
        self._paths: list[str] = paths
        layout = LeafLayout(
            paths=tuple(paths),
            shapes=tuple(tuple(p.shape) for p in params),
            selectable=tuple(selectable),
            choose_all=tuple(choose_all),
        )
        self._layout = layout
        sharded = is_sharded(params)  # FSDP2/DTensor
        why_not = _why_not_compact(self.inner_class, self.param_groups, params, paths, selectable,
                                   sharded, method)
        if compact and why_not:
            raise ValueError(why_not)
        compact = why_not is None if compact is None else compact
        runner = ShardedMethodRunner if sharded else MethodRunner
        self._runner = runner(method, layout, params)
        # A LeafwiseMethod (ID3) selects one parameter at a time (no whole-model scores or
        # masks) where that saves memory: streaming, or models of at least one chunk. Below
        # that, one whole-model program per step is faster (a fixed cost per parameter).
        big = (getattr(self, "_stream_requested", False)
               or sum(p.numel() for p, s in zip(params, selectable) if s) >= LEAFWISE_MIN)
        leafwise = (bool(compact) and big and isinstance(method, LeafwiseMethod)
                    and method.leafwise)
        # A LeafwiseInitMethod (PaFI) chooses its fixed mask the same way: no whole-model
        # float32 score array at construction.
        fixed_leafwise = (bool(compact) and big and isinstance(method, LeafwiseInitMethod)
                          and method.leafwise_init)
        chosen: dict[int, torch.Tensor] = {}
        try:
            if leafwise:  # it starts from choose_all only: no mask to compute (or keep)
                method.effective_budget(layout)  # the budget checks of its init
                masks = [None] * len(params)
            elif fixed_leafwise:
                with torch.no_grad():
                    chosen = choose_fixed_mask(method, params, selectable,
                                               method.effective_budget(layout))
                masks = [None] * len(params)
            else:
                masks = self._runner.init(params)
        except ValueError as e:
            msg = str(e).replace("use selective_fft() instead", "use the method 'fft' instead")
            raise ValueError(msg) from None
        self._status = [
            FULL if c else PARTIAL if s else EMPTY for s, c in zip(selectable, choose_all)
        ]
        self._masks: list[torch.Tensor | None] = [
            m if st == PARTIAL else None for m, st in zip(masks, self._status)
        ]
        self._count = 0
        self._budget = (  # a method without a budget selects every eligible entry
            method.budget if method.budget is not None else layout.num_selectable + layout.num_choose_all
        )
        self._compact: CompactState | None = None
        if compact:
            self._compact = CompactState(
                params, groups, selectable, choose_all, self._budget - layout.num_choose_all
            )
            for i, m in enumerate(self._masks):
                if m is not None and selectable[i]:
                    self._compact.add_mask(i, m)
                elif i in chosen:
                    self._compact.add(i, chosen[i])
        self._leafwise: LeafwiseSelector | None = None
        if leafwise:
            # the per-step top-k one parameter at a time (no whole-model scores or masks)
            # weights of layers chunked by row_grads: one selection chunk per block of rows
            row_chunks = {i: (p[0].numel(), rows) for i, p in enumerate(params)
                          if (rows := block_rows(p)) is not None}
            self._leafwise = LeafwiseSelector(method, [p.numel() for p in params],
                                              row_chunks=row_chunks,
                                              keep_grads=self._stream_requested)
            self._b_eff = method.effective_budget(layout)
        self._drop_masks()
        self._initial = _verify.snapshot(params) if verify else None
        self._shortfall_warned = False
        self._zero = {}
        if method.frozen_after == 0:
            self._classify()
        self._selective_ready = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_selective_ready", False):
            raise RuntimeError(
                "a selective optimizer fixes its parameters at construction (the budget and "
                "the masks depend on them); pass every param group to the constructor."
            )
        super().add_param_group(param_group)

    def _classify(self) -> None:
        """Once the masks are final: mark all-true leaves FULL and all-false leaves EMPTY."""
        for i, m in enumerate(self._masks):
            if self._status[i] != PARTIAL:
                continue
            if m is None:  # compact: the slots are the record
                n = int(self._compact.indices_of(i).numel())
                empty, full = n == 0, n == self._params[i].numel()
            else:
                empty, full = not _dist.any_true(m), _dist.all_true(m)
            if empty:
                self._status[i], self._masks[i] = EMPTY, None
            elif full:
                self._status[i], self._masks[i] = FULL, None

    def _drop_masks(self) -> None:
        """With the compact state, the slot indices say which entries are selected: the dense
        masks are dropped (one byte per entry) once no method call needs them, i.e. for ID3's
        leafwise selection and once a method's mask is fixed."""
        if self._compact is not None and (self._leafwise is not None or self._mask_fixed()):
            self._masks = [None] * len(self._masks)
            self._runner.forget_masks()

    # -- masks -------------------------------------------------------------------------------
    @property
    def method(self) -> Any:
        """The ``optax_selective`` method object that selects the entries."""
        return self._runner.method

    @property
    def compact(self) -> bool:
        """Whether the inner optimizer keeps state for the selected entries only."""
        return self._compact is not None

    # -- selective-optimizers 0.4's attribute names (read-only) -------------------------------
    @property
    def budget(self) -> int:
        """The budget: entries that may ever change, choose_all groups included (0.4's name)."""
        return self._budget

    @property
    def max_steps(self) -> int | None:
        """ID3's ``max_steps`` (0.4's name); None for methods without one."""
        return getattr(self._runner.method, "max_steps", None)

    @property
    def global_step(self) -> int:
        """Number of ``step()`` calls so far (0.4's name; same as :attr:`count`)."""
        return self._count

    @property
    def verify(self) -> bool:
        """Whether ``post_train_work()`` verifies (the ``verify=`` argument; 0.4's name)."""
        return self._initial is not None

    @property
    def stream_grads(self) -> bool:
        """Whether gradients are consumed during backward (``stream_grads=True``)."""
        return bool(getattr(self, "_streaming", False))

    @property
    def count(self) -> int:
        """Number of ``step()`` calls so far (the method's ``t``)."""
        return self._count

    def get_masks(self) -> list[torch.Tensor]:
        """One bool tensor per parameter, in leaf order: true where an entry may change.

        Example:
          >>> import torch
          >>> model = torch.nn.Linear(2, 1)
          >>> with torch.no_grad():
          ...     _ = model.weight.copy_(torch.tensor([[0.5, -2.0]])), model.bias.fill_(1.0)
          >>> opt = get_selective_optimizer(torch.optim.SGD, "pafi")(
          ...     model.parameters(), lr=0.1, budget=2)  # the 2 smallest |θ|: 0.5 and 1.0
          >>> [m.tolist() for m in opt.get_masks()]
          [[[True, False]], [True]]
        """
        out = []
        for p, st, m in zip(self._params, self._status, self._masks):
            if st == PARTIAL:
                out.append(m if m is not None else self._compact.mask_of(len(out), p))
            else:
                out.append(_dist.full_mask(p, st == FULL))
        return out

    def get_budget_used(self) -> int:
        """Entries selected so far, choose_all params included.

        Example:
          >>> import torch
          >>> model = torch.nn.Linear(4, 2)
          >>> opt = get_selective_optimizer(torch.optim.SGD, "pafi")(
          ...     [{"params": [model.weight]}, {"params": [model.bias], "choose_all": True}],
          ...     lr=0.1, budget=5)
          >>> opt.get_budget_used()  # the bias's 2 entries and the weight's 3 smallest
          5
        """
        used = 0
        for i, (p, st, m) in enumerate(zip(self._params, self._status, self._masks)):
            if st == PARTIAL and m is None:
                used += int(self._compact.indices_of(i).numel())
            else:
                used += p.numel() if st == FULL else _dist.count_true(m) if st == PARTIAL else 0
        return used

    # -- the step ----------------------------------------------------------------------------
    def _select(self) -> None:
        frozen_after = self._runner.method.frozen_after
        if frozen_after is not None and self._count >= frozen_after:
            return
        if self._leafwise is not None:
            self._select_leafwise()
            if frozen_after is not None and self._count + 1 >= frozen_after:
                self._classify()
            return
        grads = [p.grad for p in self._params]
        active = [
            i for i, (st, g) in enumerate(zip(self._status, grads))
            if st == PARTIAL and g is not None and self._layout.selectable[i]
        ]
        if not active and PARTIAL in self._status:
            self._warn_no_selection("no selectable parameter has a gradient")
        elif active and isinstance(self._runner.method, LeafwiseMethod) and not any(
                bool(_dist.local(grads[i]).isfinite().any()) for i in active):  # ID3's scores
            self._warn_no_selection("every gradient entry is NaN or infinite")
        if active:
            for i in active:
                if grads[i].is_sparse:
                    raise ValueError(f"{self._paths[i]} has a sparse gradient; not supported.")
            args = (self._count, active, self._masks, grads, self._params)
            if self._compact is None:
                for i, m in self._runner.update(*args).items():
                    self._masks[i] = m
            else:
                entries = self._runner.update_entries(*args)
                if entries is not None:  # the method listed the new entries: the slots
                    self._compact.add_entries(*entries)  # record them, the runner keeps
                    for i in active:  # the masks for its next call
                        self._masks[i] = None
                else:
                    for i, m in self._runner.torch_masks(active, self._params).items():
                        self._compact.add_mask(i, m, self._masks[i])
                        self._masks[i] = m
        if frozen_after is not None and self._count + 1 >= frozen_after:
            self._classify()
            if self._compact is not None:
                self._masks = [None] * len(self._masks)  # fixed: the slots are the record
                self._runner.forget_masks()

    @torch.no_grad()
    def _select_leafwise(self) -> None:
        """A LeafwiseMethod's step with the compact state: candidates leaf by leaf, one
        global merge."""
        sel = self._leafwise
        offered = bool(self._streamed)
        if not self._streaming:
            for i, (p, st) in enumerate(zip(self._params, self._status)):
                if st == PARTIAL and p.grad is not None and self._layout.selectable[i]:
                    if p.grad.is_sparse:
                        raise ValueError(f"{self._paths[i]} has a sparse gradient; not supported.")
                    sel.offer(i, p.grad, p, self._compact.indices_of(i))
                    offered = True
        k = step_size(self._runner.method, self._count, self._b_eff)
        added = 0
        for i, (idx, grads) in sel.finish(k).items():
            self._compact.add(i, idx)
            added += int(idx.numel())
            if self._streaming:
                self._compact.set_grads(i, grads)
        if k > 0 and not offered and PARTIAL in self._status:
            self._warn_no_selection("no selectable parameter has a gradient")
        elif k > 0 and added == 0 and PARTIAL in self._status:
            self._warn_no_selection("every gradient entry is NaN or infinite")

    def _warn_no_selection(self, why: str) -> None:
        frozen_after = self._runner.method.frozen_after
        warnings.warn(
            f"step() {self._count} of {frozen_after}: {why}, so this selection step adds no "
            f"entry and is used up (the budget may not be reached after {frozen_after} steps). "
            "Call backward() before step(), and skip the step (e.g. with a GradScaler) when "
            "the loss is not finite.", RuntimeWarning, stacklevel=2)

    # -- streaming ---------------------------------------------------------------------------
    def _start_streaming(self) -> None:
        if self._compact is None:
            raise ValueError(
                "stream_grads=True needs the compact state; "
                + (_why_not_compact(self.inner_class, self.param_groups, self._params, self._paths,
                                    self._layout.selectable, is_sharded(self._params),
                                    self._runner.method) or "pass compact=True.")
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
            torch.distributed.get_world_size() > 1
        ):
            raise ValueError(
                "stream_grads=True is not supported with several processes: data-parallel "
                "wrappers (DDP) all-reduce gradients in buckets after the hooks that stream "
                "them, so the streamed gradients would be local ones. Use stream_grads=False."
            )
        self._streaming = True
        for i, p in enumerate(self._params):
            if self._layout.selectable[i]:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._stream_hook(i)))
                # layers changed by row_grads.chunk_weight_grads hand their rows to us
                set_row_sink(p, _RowSinkRef(self._takes_rows, self._take_rows, i))

    def _takes_rows(self, i: int, rows: int) -> bool:
        """Whether to take parameter ``i``'s gradient in blocks of ``rows`` rows (row_grads)
        this backward; if not, it comes whole (through the post-accumulate hook)."""
        if not self._streaming:
            return False
        if self._status[i] == EMPTY:
            return True  # dropped anyway
        if self._mask_fixed():
            return True  # gathered only: any blocks do
        if self._leafwise is None:
            return False  # scored from dense gradients (FISH's fish_steps)
        if self._leafwise.rows_per_chunk(i) == rows:
            return True
        if not self._row_warned:
            self._row_warned = True
            warnings.warn(
                f"{self._paths[i]} belongs to a layer changed by chunk_weight_grads after this "
                "optimizer was built, so its selection does not cut it into the layer's blocks "
                "and its gradient is built whole. Call chunk_weight_grads(model) before "
                "building the optimizer.", stacklevel=2)
        return False

    @torch.no_grad()
    def _take_rows(self, i: int, start: int, g: torch.Tensor) -> None:
        """Consumes rows ``start:`` of parameter ``i``'s gradient (see ``_stream``)."""
        if self._status[i] == EMPTY:
            return
        p = self._params[i]
        frozen = self._mask_fixed()
        if start == 0:
            self._accumulating[i] = i in self._streamed
            if self._accumulating[i] and not frozen:
                self._second_gradient(i)
        if self._accumulating[i]:
            self._norm_unknown.add(i)
        else:
            self._grad_norms.setdefault(i, []).append(torch.linalg.vector_norm(g, 2.0))
        row = p[0].numel()
        self._compact.gather(i, g, accumulate=self._accumulating[i], start=start * row)
        if not frozen and not self._accumulating[i]:
            self._leafwise.offer_rows(i, start, g, p, self._compact.indices_of(i))
        if start + len(g) == len(p):
            self._streamed.add(i)

    def _stream_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        stream = weakref.WeakMethod(self._stream)  # the parameter must not keep us alive

        def hook(p: torch.Tensor) -> None:
            consume = stream()
            if consume is not None:
                consume(i, p)
        return hook

    @torch.no_grad()
    def _stream(self, i: int, p: torch.Tensor) -> None:
        """Consumes ``p.grad`` (parameter ``i``) during backward; see ``stream_grads``."""
        g = p.grad
        if g is None:
            return
        frozen = self._mask_fixed()
        if not frozen and self._leafwise is None and self._status[i] != EMPTY:
            return  # a method scored from dense gradients (FISH's fish_steps): keep them
        if g.is_sparse:
            raise ValueError(f"{self._paths[i]} has a sparse gradient; not supported.")
        if i in self._streamed or i in self._grad_norms:  # for clip_grad_norm_
            self._norm_unknown.add(i)
        else:
            self._grad_norms[i] = [torch.linalg.vector_norm(g, 2.0)]
        if self._status[i] == EMPTY:
            p.grad = None
            return
        if i in self._streamed:
            if not frozen:
                self._second_gradient(i)
            self._compact.gather(i, g, accumulate=True)
        else:
            self._compact.gather(i, g)
            if not frozen:
                self._leafwise.offer(i, g, p, self._compact.indices_of(i))
            self._streamed.add(i)
        p.grad = None

    def _mask_fixed(self) -> bool:
        """Whether the method's mask no longer changes (from step ``frozen_after`` on)."""
        frozen_after = self._runner.method.frozen_after
        return frozen_after is not None and self._count >= frozen_after

    def _second_gradient(self, i: int) -> None:
        frozen_after = self._runner.method.frozen_after
        raise RuntimeError(
            f"stream_grads=True: a second gradient reached {self._paths[i]} before step() "
            f"(a second backward, or a layer used twice) while ID3 still selects entries "
            f"(step {self._count} of {frozen_after}); its candidates were taken from the "
            "first gradient, so accumulation would not be exact. Call step() after every "
            "backward until max_steps, or use stream_grads=False."
        )

    def _forget_streamed(self) -> None:
        self._streamed.clear()
        self._grad_norms.clear()
        self._norm_unknown.clear()
        self._clip_coef = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters, which also
        sees the gradients ``stream_grads=True`` consumed during backward.

        Call it between ``backward()`` and :meth:`step` (the :class:`SelectiveCallback` does
        under ``Trainer``). Returns the total norm of the gradients, as torch's does. Without
        streaming it is torch's function on the parameters' gradients. With streaming the
        dense gradients are gone (torch's function would see none and return 0): the norm
        comes from the 2-norms the hooks took of every gradient as it was consumed, and
        :meth:`step` scales the gathered entries by the same coefficient before the inner
        step, so the update equals clipping the dense gradients.

        Example:
          >>> import torch
          >>> model = torch.nn.Linear(3, 1)
          >>> opt = get_selective_optimizer(torch.optim.SGD, "pafi")(
          ...     model.parameters(), lr=0.1, budget=2, stream_grads=True)
          >>> model(torch.ones(1, 3)).sum().backward()  # weight grads 1, 1, 1; bias grad 1
          >>> opt.clip_grad_norm_(1.0)  # the norm before clipping, of all 4 entries
          tensor(2.)
          >>> opt.step()
        """
        if not getattr(self, "_streaming", False):
            return torch.nn.utils.clip_grad_norm_(
                [p for p in self._params if p.grad is not None], max_norm, norm_type,
                error_if_nonfinite=error_if_nonfinite)
        if float(norm_type) != 2.0:
            raise ValueError(
                f"clip_grad_norm_ with stream_grads=True takes the 2-norm only (the hooks "
                f"record it as gradients stream by); got norm_type={norm_type!r}.")
        if self._norm_unknown:
            i = min(self._norm_unknown)
            raise ValueError(
                f"clip_grad_norm_ with stream_grads=True: {self._paths[i]} received several "
                "gradients since the last step (gradient accumulation, or a layer used twice), "
                "and only their sum's selected entries are kept, so the norm of the sum is "
                "unknown. Use stream_grads=False to clip accumulated gradients.")
        parts, dense = [], []  # one norm per parameter, in leaf order (as torch's function)
        for i, p in enumerate(self._params):
            if i in self._grad_norms:
                blocks = self._grad_norms[i]  # row blocks: the norm of their norms
                parts.append(blocks[0] if len(blocks) == 1
                             else torch.linalg.vector_norm(torch.stack(blocks), 2.0))
            elif p.grad is not None:
                dense.append(p.grad)
                parts.append(torch.linalg.vector_norm(p.grad, 2.0))
        if not parts:
            return torch.tensor(0.0)
        device = parts[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in parts]), 2.0)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"the total norm of the gradients is {total.item()}: non-finite, so they "
                "cannot be clipped (error_if_nonfinite=True).")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in dense:
            g.mul_(coef.to(g.device))
        self._clip_coef = coef  # the gathered entries: scaled by step(), before the inner step
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients, the streamed ones (``stream_grads=True``) included."""
        super().zero_grad(set_to_none=set_to_none)
        if getattr(self, "_streaming", False):
            self._forget_streamed()
            if self._leafwise is not None:
                self._leafwise.reset()

    def _zero_of(self, g: torch.Tensor) -> torch.Tensor:
        key = (g.dtype, g.device)
        if key not in self._zero:
            self._zero[key] = torch.zeros((), dtype=g.dtype, device=g.device)
        return self._zero[key]

    @torch.no_grad()
    def _mask_grads(self) -> None:
        for p, st, m in zip(self._params, self._status, self._masks):
            g = p.grad
            if g is None or st == FULL:
                continue
            if st == EMPTY:
                p.grad = None
            else:
                torch.where(m, g, self._zero_of(g), out=g)

    @torch.no_grad()
    def _snapshots(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        snaps = []
        scopes: dict[tuple[int, torch.dtype], str] = {}  # the scope depends on the dtype too
        for p, gi, st, m in zip(self._params, self._group_of, self._status, self._masks):
            if (gi, p.dtype) not in scopes:
                scopes[gi, p.dtype] = restore_scope(self.inner_class, self.param_groups[gi], p.dtype)
            scope = scopes[gi, p.dtype]
            if st == FULL or scope == "none" or (scope == "with_grad" and p.grad is None):
                continue
            snaps.append((p, m, p.detach().clone()))
        return snaps

    @torch.no_grad()
    def _restore(self, snaps) -> None:
        for p, m, saved in snaps:
            if m is None:
                p.copy_(saved)
            else:
                torch.where(m, p, saved, out=p)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """One selective step; ``closure`` (optional) re-evaluates the model and returns the loss.

        Other keyword arguments go to the inner ``step`` (e.g. ``grad_scale``/``found_inf``,
        which ``torch.amp.GradScaler`` passes to fused optimizers). Inside a function compiled
        with ``torch.compile`` it runs eagerly, as a graph break: the same step as without it.
        """
        if torch.compiler.is_compiling():
            # dynamo is tracing: its selection is a JAX call through DLPack, which dynamo
            # cannot trace (and traced bookkeeping selected otherwise), so leave the graph.
            # (torch.compiler.disable is applied here, not as a decorator: it imports dynamo.)
            return torch.compiler.disable(self._selective_step)(closure, **kwargs)
        return self._selective_step(closure, **kwargs)

    def _selective_step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._select()
        inner = _inner_step(self.inner_class)
        compact = self._compact
        streamed = None
        if compact is None:
            self._mask_grads()
            snaps = self._snapshots()
            scope = contextlib.nullcontext()
        else:
            if self._streaming:  # the gradients are in the buffers already (FISH scoring aside)
                if self._leafwise is not None or self._mask_fixed():
                    streamed = set(self._streamed)
            scope = compact.inner_view(self, self._params, gathered=streamed)
        with scope:
            if streamed is not None and self._clip_coef is not None:  # clip_grad_norm_ ran
                compact.scale_grads(self._clip_coef)  # on the gathered entries
            if closure is None:
                inner(self, **kwargs)
            else:
                first = [True]

                def replay():
                    if first[0]:  # the inner optimizer's first evaluation: reuse the one above
                        first[0] = False
                        return loss
                    with torch.enable_grad():
                        out = closure()
                    if compact is None:
                        self._mask_grads()
                    else:
                        compact.reload_grads(self._params)
                    return out

                inner(self, replay, **kwargs)
        if compact is None:
            self._restore(snaps)
        self._count += 1
        self._forget_streamed()
        return loss

    def state_nbytes(self) -> int:
        """Bytes of optimizer state: the inner optimizer's tensors, the masks that are kept
        and, with ``compact=True``, the slot buffers with their state and bookkeeping."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        for m in self._masks:
            if m is not None:
                total += _dist.local(m).numel()
        if self._compact is not None:  # masks the method still reads, kept on the JAX side only
            total += self._runner.held_mask_nbytes([i for i, m in enumerate(self._masks) if m is None])
        return total + (self._compact.nbytes() if self._compact is not None else 0)

    # -- after training ----------------------------------------------------------------------
    def _display_names(self, model: torch.nn.Module | None = None) -> list[str]:
        """Parameter names for messages: the model's (``model``, or the ``param_names`` of
        groups built from ``named_parameters()``), else ``param_groups[g]['params'][i]``."""
        names = list(self._paths)
        where = {}
        if model is not None:
            where = {id(p): n for n, p in _names.named_parameters(model)}
        i = 0
        for group in self.param_groups:
            given = group.get("param_names") or [None] * len(group["params"])
            for p, n in zip(group["params"], given):
                names[i] = where.get(id(p), n) or names[i]
                i += 1
        return names

    def post_train_work(self, model: torch.nn.Module | None = None) -> None:
        """Prints the budget line (as selective-optimizers 0.4 did) and, with ``verify=True``,
        checks the promise.

        Prints ``Budget allocated: <budget>, budget used: <used>``; warns once
        (``BudgetShortfallWarning``) if fewer entries than the budget were selected, with the
        likely cause. With ``verify=True`` it then raises ``VerificationError`` if the budget
        was exceeded or an unselected entry changed since construction, and prints
        ``Verification successful: ...`` otherwise; the error names parameters by their
        names in ``model`` when given (or when the optimizer was built from
        ``model.named_parameters()``). With FSDP2/DTensor parameters every rank
        must call it, as :meth:`get_summary` (it counts the selection across ranks).

        Example:
          >>> import torch
          >>> model = torch.nn.Linear(4, 2)
          >>> opt = get_selective_optimizer(torch.optim.SGD, "pafi")(
          ...     model.parameters(), lr=0.1, budget=3, verify=True)
          >>> opt.post_train_work()
          Budget allocated: 3, budget used: 3
          Verification successful: Non-chosen parameters have not changed.
        """
        used = self.get_budget_used()
        print(f"Budget allocated: {self._budget}, budget used: {used}")
        self._warn_shortfall(used)
        if self._initial is None:
            return
        _verify.check(self._initial, self._params, self.get_masks(), self._budget,
                      self._display_names(model))
        print("Verification successful: Non-chosen parameters have not changed.")

    def get_summary(self, model: torch.nn.Module) -> dict[str, Any]:
        """The O(budget) summary of ``model``'s selected entries; see :mod:`torch_bridge.summary`.

        ``model`` may be the model or ``torch.compile(model)``: the summary names parameters
        as the plain model does. Warns once, like :meth:`post_train_work`, if the budget was
        under-used.

        Example:
          >>> import torch
          >>> model = torch.nn.Linear(4, 2)
          >>> opt = get_selective_optimizer(torch.optim.SGD, "pafi")(
          ...     model.parameters(), lr=0.1, budget=3)
          >>> model(torch.ones(1, 4)).sum().backward()
          >>> opt.step()
          >>> summary = opt.get_summary(model)
          >>> summary["method"], sum(e["indices"].numel() for e in summary["params"].values())
          ('pafi', 3)
        """
        summary = _summary.make_summary(
            model, self._params, self.get_masks(), method=self._runner.method.name
        )
        self._warn_shortfall(int(summary["budget_used"]))
        return summary

    def _warn_shortfall(self, used: int) -> None:
        """The under-used budget warning, once per optimizer; never changes the selection."""
        if self._shortfall_warned or self._budget is None:
            return
        schedule = self._runner.method.frozen_after  # ID3's max_steps, FISH's fish_steps
        message = budget_shortfall_message(
            used, self._budget, self._runner.method.name, steps_run=self._count,
            max_steps=schedule if schedule else None,
        )
        if message is not None:
            self._shortfall_warned = True
            warnings.warn(message, BudgetShortfallWarning, stacklevel=3)

    # -- checkpoints -------------------------------------------------------------------------
    def _place_state(self, param: torch.Tensor, group: int, key: str, value: Any) -> Any:
        """A saved state value of ``param`` (a slot buffer of param group ``group``) moved to
        its device/dtype the way torch's own ``load_state_dict`` would."""
        policy = getattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", None)
        if not isinstance(value, torch.Tensor):
            return value
        if policy is not None:  # it reads fused/capturable from the group holding param id 0
            packed = [{**g, "params": [0] if gi == group else []}
                      for gi, g in enumerate(self.param_groups)]
            return policy(param, value, 0, packed, key)
        if key == "step":
            return value
        return value.to(device=param.device, dtype=param.dtype if value.is_floating_point() else None)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"selective"``: method, step count and masks
        (per parameter ``"full"``, ``"empty"`` or the int64 flat indices of its selection).

        Example:
          >>> import torch
          >>> model = torch.nn.Linear(2, 1)
          >>> with torch.no_grad():
          ...     _ = model.weight.copy_(torch.tensor([[0.5, -2.0]])), model.bias.fill_(1.0)
          >>> make = get_selective_optimizer(torch.optim.Adam, "pafi")
          >>> opt = make(model.parameters(), lr=0.1, budget=2)
          >>> model(torch.ones(1, 2)).sum().backward()
          >>> opt.step()
          >>> saved = opt.state_dict()
          >>> saved["selective"]["count"], saved["selective"]["masks"]
          (1, [tensor([0]), 'full'])
          >>> resumed = make(model.parameters(), lr=0.1, budget=2)
          >>> resumed.load_state_dict(saved)
          >>> resumed.count, resumed.get_budget_used()
          (1, 2)
        """
        sd = super().state_dict()
        masks: list[Any] = []
        for st, m in zip(self._status, self._masks):
            if st != PARTIAL:
                masks.append(st)
            elif m is None:
                masks.append(torch.sort(self._compact.indices_of(len(masks)).cpu()).values)
            else:
                masks.append(_dist.selected_entries(m, m)[0])
        sd[STATE_KEY] = {"method": self._runner.method.name, "count": self._count, "masks": masks,
                         "budget": self._budget, "shapes": [list(p.shape) for p in self._params]}
        frozen_after = self._runner.method.frozen_after
        if frozen_after is None or self._count < frozen_after:  # the method's state still counts
            sd[STATE_KEY]["method_state"] = self._runner.state_tensors()
        if self._compact is not None:
            sd[STATE_KEY]["compact"] = self._compact.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by :meth:`state_dict` of the same kind of optimizer.

        Everything is checked before anything changes (see :mod:`torch_bridge.state_check`):
        the same method, budget and parameter shapes, masks within the budget, a step
        count ``>= 0``, inner state of the parameters' shapes. On any mismatch a
        ``ValueError`` names it and the optimizer is left exactly as it was.

        Example:
          >>> import torch
          >>> model = torch.nn.Linear(2, 1)
          >>> make = get_selective_optimizer(torch.optim.SGD, "pafi")
          >>> saved = make(model.parameters(), lr=0.1, budget=2).state_dict()
          >>> make(model.parameters(), lr=0.1, budget=1).load_state_dict(saved)
          Traceback (most recent call last):
          ...
          ValueError: state_dict was saved with budget 2, this optimizer has budget 1; build the optimizer with budget=2 to resume.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}.")
        state_dict = dict(state_dict)
        sel = state_dict.pop(STATE_KEY, None)
        if sel is None:
            raise ValueError(legacy_state_message(state_dict) or (
                f"state_dict has no {STATE_KEY!r} entry: it was not saved by a selective "
                "optimizer, so the masks and step count cannot be restored."
            ))
        status, tensors = check_state(
            sel, state_dict, params=self._params, paths=self._paths, layout=self._layout,
            method=self._runner.method.name, budget=self._budget, compact=self._compact,
            inner_class=self.inner_class,
        )
        method = self._runner.method.name
        frozen_after = self._runner.method.frozen_after
        selecting = 0 < int(sel["count"]) and (frozen_after is None or int(sel["count"]) < frozen_after)
        if selecting and "method_state" not in sel:
            raise ValueError(  # e.g. FISH's running Fisher sum
                f"state_dict was saved during {method}'s selection (after {int(sel['count'])} of "
                f"{frozen_after} steps) without the method's state, so that state is lost; save "
                "it again with this version, or restart selection from step 0."
            )
        kept = (self.state, self.param_groups,
                [] if self._compact is None else
                [(b, b.members, b.filled, b.state) for b in self._compact.buffers.values()])
        try:
            super().load_state_dict(state_dict)
            if self._compact is not None:
                self._compact.load_state_dict(sel["compact"], self._place_state)
        except BaseException:
            self.state, self.param_groups = kept[0], kept[1]
            for b, members, filled, st in kept[2]:
                b.members, b.filled, b.state = members, filled, st
            raise
        self._status, self._masks = status, tensors
        self._count = int(sel["count"])
        self._runner.forget_masks()
        if "method_state" in sel:
            self._runner.load_state_tensors(sel["method_state"])
        self._drop_masks()
        if frozen_after is not None and self._count >= frozen_after:
            self._classify()


class _RowSinkRef:
    """The row sink (``row_grads``) of parameter ``i`` of a streaming optimizer, held weakly
    (through its bound methods): calling it gives the sink, or None once the optimizer is
    gone."""

    def __init__(self, takes_rows: Callable[[int, int], bool],
                 take_rows: Callable[[int, int, torch.Tensor], None], i: int):
        self._takes, self._take, self._i = weakref.WeakMethod(takes_rows), weakref.WeakMethod(take_rows), i

    def __call__(self) -> _RowSinkRef | None:
        return self if self._takes() is not None else None

    def takes_rows(self, rows: int) -> bool:
        takes = self._takes()
        return takes is not None and takes(self._i, rows)

    def take_rows(self, start: int, grad_rows: torch.Tensor) -> None:
        take = self._take()
        if take is not None:
            take(self._i, start, grad_rows)


def _check_inner_kwargs(inner_class: type, kwargs: dict, method_args: Any) -> None:
    """Names a keyword argument neither the method nor the inner optimizer takes (a typo
    such as ``max_step``) before anything else complains about it."""
    try:
        sig = inspect.signature(inner_class.__init__)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    own = ("verify", "compact", "stream_grads", "initial_params_path")
    unknown = [k for k in kwargs if k not in sig.parameters and k not in own]
    if unknown:
        known = sorted({*method_args, *LEGACY_ARGS, *own,
                        *(k for k in sig.parameters if k not in ("self", "params"))})
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}."
        raise TypeError(
            f"unknown keyword argument {unknown[0]!r}: neither the method and the selective "
            f"optimizer nor {inner_class.__name__} take it{hint}")


def _announce_default_weight_decay(inner_class: type, params: Any, args: tuple, kwargs: dict) -> None:
    """Warns when ``inner_class``'s nonzero default weight decay applies without the user
    having asked for it (selective-optimizers 0.4 forced ``weight_decay=0``; it is now
    honoured, on the selected entries only)."""
    try:
        sig = inspect.signature(inner_class)
        default = sig.parameters["weight_decay"].default
        explicit = "weight_decay" in sig.bind_partial(params, *args, **kwargs).arguments
    except (KeyError, TypeError, ValueError):  # no such argument, or arguments torch will refuse
        return
    if explicit or default is inspect.Parameter.empty or isinstance(default, torch.Tensor) or not default:
        return
    groups = params if isinstance(params, list) else []
    if groups and all(isinstance(g, dict) and "weight_decay" in g for g in groups):
        return
    warnings.warn(
        f"{inner_class.__name__} applies its default weight_decay={default} to the selected "
        "entries (selective-optimizers 0.4 forced weight_decay=0; unselected entries never "
        f"change either way). Pass weight_decay=0.0 for 0.4's behaviour, or "
        f"weight_decay={default} to keep the decay without this warning.",
        UserWarning,
        stacklevel=3,  # the user's constructor call
    )


def _why_not_compact(inner_class, param_groups, params, paths, selectable, sharded,
                     method: Any) -> str | None:
    """Why ``compact=True`` cannot reproduce the dense form here (None: it can)."""
    if sharded:
        return ("compact=True is not supported for DTensor/FSDP2-sharded parameters; use "
                "compact=False.")
    if method.budget is None:
        return (f"compact=True is pointless for method {method.name!r}: it has no budget (it "
                "selects every entry).")
    for p, path, ok in zip(params, paths, selectable):
        if ok and not p.is_contiguous():
            return f"compact=True needs contiguous parameters; {path} is not."
    return compact_refusal(inner_class, param_groups)
