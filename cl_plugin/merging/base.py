"""The streaming merger interface shared by every merging method.

A merger folds one task vector at a time into a fixed-size state and can
return the merged task vector at any point. Its state is declared once per
class (:attr:`Merger.tensor_states`, :attr:`Merger.scalar_states`); ``reset``,
``state_dict`` and ``load_state_dict`` are derived from that declaration, so a
method cannot forget to checkpoint a field.

Every change of state is all or nothing. :meth:`Merger.update` checks its
input, and that the fold cannot overflow, before it writes; :meth:`Merger.load_state_dict`
checks the whole saved state before it assigns any of it.

Two options apply to every method through this class: DARE
(``get_merger(name, dare=p, dare_seed=s)``, :mod:`cl_plugin.merging.dare`),
applied to each incoming task vector before the fold and recorded in
:meth:`Merger.options`; and, for a method that sets
:attr:`Merger.requires_fisher`, the per-tensor Fisher that
``update(task_vector, fisher=...)`` checks with the task vector.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from cl_plugin._checks import (
    check_same_aliases,
    check_same_layout,
    check_scale,
    finite_max_abs,
    is_finite,
    max_abs,
    tensor_norm,
)
from cl_plugin.errors import CheckpointError, ConfigError, NonFiniteError, preview
from cl_plugin._packed import aligned_runs, difference_chunks, packed_like
from cl_plugin.task_vectors import StateDictLike, TaskVector, norm_of_norms

__all__ = ["Merger", "accumulate_dtype"]

#: The version of :meth:`Merger.state_dict`'s layout; a state without
#: ``format_version`` is read as version 1.
STATE_FORMAT_VERSION = 1
#: The keys of a state that are not tensors (besides each method's scalar states).
_META_KEYS = ("format_version", "method", "options", "scale", "num_tasks", "input_dtypes", "aliases")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a running sum of ``dtype`` values is kept in.

    16-bit floats lose most of their mantissa when many task vectors are
    summed, so their sums are kept in float32; wider floats are kept as they are.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _LoadedState(NamedTuple):
    """A saved state that passed every check, not yet assigned."""

    num_tasks: int
    scale: float | None
    scalars: dict[str, Any]
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]]
    tensors: dict[str, dict[str, Tensor]]
    aliases: dict[str, str]
    largest: dict[str, dict[str, float]]


class Merger:
    """Base class of the streaming mergers.

    Subclasses set :attr:`name`, :attr:`default_scale`, :attr:`tensor_states`,
    :attr:`scalar_states` and :attr:`summed_roles`, and implement :meth:`_fold`
    and :meth:`_finalize`; they may add checks of a loaded state in
    :meth:`_check_loaded_state`.

    Args:
        scale: the factor λ that :meth:`apply_to` uses; ``None`` means the
            method's :attr:`default_scale`. Must be in (0, 10].

    Raises:
        ConfigError: ``scale`` is not a real number in (0, 10].

    The state is allocated on the device of the first task vector and every
    later task vector is moved there. Tied tensors (see
    :func:`~cl_plugin.task_vectors.tied_aliases`) are folded once: the merger
    keeps the :attr:`~cl_plugin.TaskVector.aliases` of the first task vector,
    requires the same of every later one, and returns them with :meth:`merged`.
    """

    name: ClassVar[str] = ""
    default_scale: ClassVar[float] = 1.0
    #: Per-parameter tensor states: role -> "accumulate" (float32 for 16-bit
    #: inputs), "same" (the input dtype) or "count" (an int32 counter).
    tensor_states: ClassVar[dict[str, str]] = {}
    #: Scalar states: name -> default value (plain Python numbers).
    scalar_states: ClassVar[dict[str, Any]] = {}
    #: The tensor-state role that already is the merged vector (no finalisation
    #: needed), or None.
    merged_role: ClassVar[str | None] = None
    #: Roles to which a fold adds (part of) the incoming entries, so that a sum
    #: of finite values can overflow. For each, the merger keeps an upper bound
    #: of the magnitudes in the state (recomputed on load, never saved) and, only
    #: when the bound plus the incoming tensor's largest magnitude could reach
    #: the dtype's maximum, asks :meth:`_fold_max_abs` for the exact result.
    summed_roles: ClassVar[tuple[str, ...]] = ()
    #: The method weighs each task by its diagonal Fisher: :meth:`update` then
    #: requires ``fisher=`` and checks it (names, shapes, finite, >= 0) with
    #: the task vector, and passes it to :meth:`_fold` as ``fisher=``.
    requires_fisher: ClassVar[bool] = False
    #: DARE's drop rate (None: off) and seed; set by ``get_merger(name, dare=p,
    #: dare_seed=s)`` through :meth:`_configure_dare`, before any update.
    _dare: float | None = None
    _dare_seed: int = 0
    #: This rank's slice of every tensor when the merge is sharded over processes
    #: (:class:`~cl_plugin.merging.layout.ShardLayout`, set by the boundary core); None:
    #: the task vectors hold whole tensors. Elementwise rules ignore it; rules that need
    #: a global statistic or a whole tensor use its collectives.
    layout = None
    #: For a rule that works on whole matrices (OPCM): the cost of one tensor's
    #: update from its shape, by which ``ShardLayout.owners`` assigns each tensor
    #: an owner rank. When the core splits replicated weights itself (DDP), it
    #: places each 2-D tensor whole on its owner, which then folds it with no
    #: gather and no scatter. None: every tensor split evenly.
    whole_matrix_cost: ClassVar[Callable[[tuple[int, ...]], float] | None] = None
    #: The rule is elementwise (given what :meth:`_prepare_streamed` reads from whole passes
    #: over τ, e.g. TIES's threshold), adds the incoming entries themselves to its summed
    #: roles, and reads the task vector only through :meth:`_fold_chunk` and
    #: :meth:`_prepare_streamed` (MagMax, task arithmetic, average, TIES): the boundary core
    #: can then form τ chunk by chunk inside the fold (:meth:`update_streamed`), never whole.
    streams: ClassVar[bool] = False
    #: The rule reads the task vector one tensor at a time (OPCM projects each matrix whole):
    #: the boundary core can then form each tensor of τ when the rule reads it, never the whole
    #: τ (:meth:`update_streamed` hands :meth:`_fold_difference` a mapping that forms them), and
    #: the rule writes its new state in place (an interrupted fold leaves it unusable).
    streams_by_tensor: ClassVar[bool] = False
    #: With :attr:`streams`: the rule depends on each element's position (random selection's
    #: draws), so :meth:`_fold_chunk` also gets ``pieces=[(name, offset, length), ...]``, what
    #: the chunk is made of in order (offset: in this rank's flattened slice of ``name``).
    chunk_pieces: ClassVar[bool] = False
    #: The merged vector is computed tensor by tensor (:meth:`_finalize_one`), so it can be
    #: read one tensor at a time (:meth:`merged_one`) without the whole merge in memory.
    finalizes_by_tensor: ClassVar[bool] = False

    def __init__(self, *, scale: float | None = None) -> None:
        self._scale = None if scale is None else check_scale(scale, f"{type(self).__name__}")
        self.reset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each method's options() lists the arguments of its own constructor.
        # DARE is common to every method, so the DARE options are added to
        # whatever a subclass's options() returns: a checkpoint then records
        # them and load_state_dict compares them, whichever method it is.
        super().__init_subclass__(**kwargs)
        # `streams` and `finalizes_by_tensor` promise that `_fold_chunk` / `_finalize_one` compute
        # what this class's `_fold` / `_finalize` do: a subclass that overrides those would
        # otherwise inherit the parent's chunk rule silently. Each class declares them itself.
        for flag in ("streams", "streams_by_tensor", "chunk_pieces", "finalizes_by_tensor"):
            if flag not in cls.__dict__:
                setattr(cls, flag, False)
        own = cls.__dict__.get("options")
        if own is not None and not getattr(own, "_adds_dare", False):

            @functools.wraps(own)
            def options(self) -> dict[str, Any]:
                return {**own(self), **self._dare_options()}

            options._adds_dare = True  # type: ignore[attr-defined]
            cls.options = options  # type: ignore[method-assign]

    def _configure_dare(self, p: float | None, seed: int) -> None:
        """Turn DARE on (``p`` in (0, 1)) or off (None) for every later update; only before the first.

        ``get_merger`` checks ``p`` and ``seed`` (:func:`~cl_plugin.merging.dare.check_dare`).
        """
        if self.num_tasks:
            raise ConfigError(
                f"The {self.name!r} merger has already folded {self.num_tasks} task(s); DARE is chosen when the "
                "merger is created: get_merger(name, dare=p, dare_seed=seed)."
            )
        self._dare, self._dare_seed = p, seed

    def _dare_options(self) -> dict[str, Any]:
        return {} if self._dare is None else {"dare": self._dare, "dare_seed": self._dare_seed}

    # -- configuration ------------------------------------------------------
    @property
    def scale(self) -> float:
        """The scale :meth:`apply_to` uses (the method's default unless one was given)."""
        return self.default_scale if self._scale is None else self._scale

    def options(self) -> dict[str, Any]:
        """The method-specific options, as passed to the constructor (for checkpoints).

        With DARE on, ``dare`` and ``dare_seed`` are included (for every method),
        so ``get_merger(self.name, **self.options())`` builds the same merger.
        """
        return self._dare_options()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts + ', ' if opts else ''}scale={self.scale}, num_tasks={self.num_tasks})"

    # -- state -----------------------------------------------------------------
    def reset(self) -> None:
        """Forget every task folded so far."""
        self._damaged = False
        self.num_tasks = 0
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._state: dict[str, dict[str, Tensor]] = {role: {} for role in self.tensor_states}
        self._scalars: dict[str, Any] = dict(self.scalar_states)
        self._aliases: dict[str, str] = {}
        # Upper bounds of the magnitudes in the summed roles: role -> name -> float.
        self._bounds: dict[str, dict[str, float]] = {role: {} for role in self.summed_roles}

    def _role_dtype(self, role: str, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype role ``role`` keeps for an input tensor of ``input_dtype``."""
        kind = self.tensor_states[role]
        if kind == "count":
            return torch.int32
        return accumulate_dtype(input_dtype) if kind == "accumulate" else input_dtype

    def _allocated(self, tv: TaskVector) -> dict[str, dict[str, Tensor]]:
        """A new zero state shaped as ``tv``, each role packed (one buffer per dtype, see :mod:`cl_plugin._packed`)."""
        return {
            role: packed_like(tv, dtype=lambda t, role=role: self._role_dtype(role, t.dtype))
            for role in self.tensor_states
        }

    def _runs(self, tv: TaskVector, *roles: str) -> list[tuple[Tensor, ...]]:
        """Flat views ``(state[role] for role in roles) + (incoming,)`` over the names of ``tv``, as few as possible.

        The whole state in one run when the state and ``tv`` are packed (the
        boundary core's task vectors are); else one run per tensor. The state
        views write through (the state is always contiguous).
        """
        names = list(tv)
        return aligned_runs(*([self._state[role][n] for n in names] for role in roles), [tv[n] for n in names])

    @property
    def device(self) -> torch.device | None:
        """Where the state lives (None before the first update)."""
        for tensors in self._state.values():
            for t in tensors.values():
                return t.device
        return None

    def state_dict(self) -> dict[str, Any]:
        """A flat dict: ``format_version``, ``method``, ``options``, ``scale``,
        ``num_tasks``, ``input_dtypes``, ``aliases`` (tied names, alias ->
        canonical), the scalar states, and one tensor per ``"<role>.<name>"``
        (a tied tensor once, under its canonical name).

        The tensors are the live state, not copies; clone them if the merger
        will keep updating after you store the dict in memory.
        """
        self._check_intact()
        out: dict[str, Any] = {
            "format_version": STATE_FORMAT_VERSION,
            "method": self.name,
            "options": self.options(),
            "scale": self._scale,
            "num_tasks": self.num_tasks,
            "input_dtypes": {n: str(dtype).removeprefix("torch.") for n, (_, dtype) in self._layout.items()},
            "aliases": dict(self._aliases),
        }
        out.update(self._scalars)
        for role, tensors in self._state.items():
            for n, t in tensors.items():
                out[f"{role}.{n}"] = t
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`, continuing the stream exactly.

        The whole state is checked first and assigned only when every check
        passes, so a failed load leaves the merger as it was. The tensors are
        copied (made contiguous where they were not) onto the device they are on.

        Raises:
            ConfigError: the state is sound but belongs to another method, or
                was written with other options (each differing option is named).
            CheckpointError: the state is corrupt: not a mapping, a
                ``format_version`` that is not an integer or is newer than this
                cl-plugin reads, missing or unexpected keys, a ``num_tasks``,
                ``scale`` or scalar state of the wrong type or out of range,
                ``input_dtypes`` that do not name a floating-point dtype for
                exactly the saved tensors, a tensor of the wrong dtype for its
                role, of another shape in another role, on another device or
                holding NaN or infinity, tensors without tasks or tasks without
                tensors, ``aliases`` that do not fit the tensors, or a method's
                own consistency check (:meth:`_check_loaded_state`).
        """
        loaded = self._validated(state)
        with torch.no_grad():
            tensors = {}
            position = {n: i for i, n in enumerate(loaded.layout)}
            for role, by_name in loaded.tensors.items():
                # Packed in the layout's order, the order updates fold in.
                by_name = {n: by_name[n] for n in sorted(by_name, key=lambda n: position.get(n, len(position)))}
                tensors[role] = packed_like(by_name, fill=None)
                for n, t in by_name.items():
                    tensors[role][n].copy_(t.detach())
        # Every check has passed and every copy is made: nothing below can fail.
        self._damaged = False
        self._state = tensors
        self._layout = loaded.layout
        self._scalars = loaded.scalars
        self._scale = loaded.scale
        self._aliases = loaded.aliases
        self._bounds = {role: dict(loaded.largest[role]) for role in self.summed_roles}
        self.num_tasks = loaded.num_tasks

    def _validated(self, state: object) -> _LoadedState:
        """Check a saved state completely; return what :meth:`load_state_dict` assigns."""
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"{owner} expects a mapping, got {type(state).__name__}. Pass what Merger.state_dict() returned."
            )
        version = state.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 1:
            raise CheckpointError(
                f"{owner}: `format_version` must be a positive integer, got {version!r}; the state is corrupt."
            )
        if version > STATE_FORMAT_VERSION:
            raise CheckpointError(
                f"{owner}: the state has format_version {version}, newer than this cl-plugin understands "
                f"({STATE_FORMAT_VERSION}); upgrade cl-plugin to resume it."
            )
        if "method" not in state or not isinstance(state["method"], str):
            raise CheckpointError(
                f"{owner}: `method` must name a merging method, got {state.get('method', '<missing>')!r}; "
                "the state is corrupt."
            )
        method = state["method"]
        if method != self.name:
            raise ConfigError(
                f"This state belongs to the merger {method!r}, not {self.name!r}. "
                f"Create it with get_merger({method!r}, ...) instead."
            )
        if "options" not in state or not isinstance(state["options"], Mapping):
            raise CheckpointError(
                f"{owner}: `options` must be a mapping of the method's options, got "
                f"{state.get('options', '<missing>')!r}; the state is corrupt."
            )
        options, mine = dict(state["options"]), self.options()
        if options != mine:
            differ = [
                f"`{k}`: saved {options.get(k, '<not set>')!r}, here {mine.get(k, '<not set>')!r}"
                for k in dict.fromkeys([*mine, *options])
                if options.get(k, _MISSING) != mine.get(k, _MISSING)
            ]
            raise ConfigError(
                f"The saved {self.name!r} merger used options {options}, this one has {mine} "
                f"({'; '.join(differ)}). Create the merger with get_merger({self.name!r}, **{options}) to resume it."
            )

        # -- keys -----------------------------------------------------------------
        meta = {*_META_KEYS, *self.scalar_states}
        required = ["num_tasks", "input_dtypes", *self.scalar_states]
        missing = [k for k in required if k not in state]
        unexpected: list[str] = []
        by_role: dict[str, dict[str, Any]] = {role: {} for role in self.tensor_states}
        for key, value in state.items():
            if key in meta:
                continue
            role, dot, name = key.partition(".") if isinstance(key, str) else ("", "", "")
            if dot and name and role in by_role:
                by_role[role][name] = value
            else:
                unexpected.append(key)
        input_dtypes = state.get("input_dtypes")
        names = list(input_dtypes) if isinstance(input_dtypes, Mapping) else []
        seen = set(names)
        for by_name in by_role.values():
            for n in by_name:
                if n not in seen:
                    names.append(n)
                    seen.add(n)
        missing += [f"{role}.{n}" for role, by_name in by_role.items() for n in names if n not in by_name]
        if missing or unexpected:
            raise CheckpointError(
                f"Cannot load the {self.name!r} merger state: missing keys [{preview(missing)}], "
                f"unexpected keys [{preview(unexpected)}]. It is corrupt, or was not written by "
                f"{type(self).__name__}.state_dict()."
            )

        # -- plain values -------------------------------------------------------------
        scale = state.get("scale", self._scale)
        if scale is not None:
            try:
                scale = check_scale(scale, owner)
            except ConfigError:
                raise CheckpointError(
                    f"State entry 'scale' must be None or a real number in (0, 10], got {scale!r}; the state is corrupt."
                ) from None
        num_tasks = state["num_tasks"]
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral) or num_tasks < 0:
            raise CheckpointError(
                f"State entry 'num_tasks' must be an integer >= 0, got {num_tasks!r}; the {self.name!r} merger "
                "state is corrupt."
            )
        num_tasks = int(num_tasks)
        scalars = {k: self._checked_scalar(k, state[k], default) for k, default in self.scalar_states.items()}
        if not isinstance(input_dtypes, Mapping):
            raise CheckpointError(
                f"State entry 'input_dtypes' must map tensor names to dtype names, got {type(input_dtypes).__name__}."
            )
        uncovered = [n for n in names if n not in input_dtypes]
        if uncovered:
            raise CheckpointError(
                f"State entry 'input_dtypes' lacks {preview(uncovered)}: it must name the input dtype of every "
                "saved tensor."
            )
        layout_dtypes = {n: _float_dtype(n, input_dtypes[n]) for n in names}

        # -- tensors ------------------------------------------------------------------
        if (num_tasks == 0) != (not names):
            raise CheckpointError(
                f"State entry 'num_tasks' is {num_tasks} but the state holds {len(names)} tensor name(s): "
                "a merger holds tensors exactly when it has folded a task. The state is corrupt."
            )
        layout, largest = self._checked_tensors(names, by_role, layout_dtypes)
        aliases = self._checked_aliases(state.get("aliases", {}), names)
        tensors = {role: {n: by_role[role][n] for n in names} for role in self.tensor_states}
        self._check_loaded_state(num_tasks=num_tasks, scalars=scalars, tensors=tensors, largest=largest)
        return _LoadedState(num_tasks, scale, scalars, layout, tensors, aliases, largest)

    def _checked_tensors(
        self, names: list[str], by_role: Mapping[str, Mapping[str, Any]], input_dtypes: Mapping[str, torch.dtype]
    ) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, dict[str, float]]]:
        """Check every saved tensor; return the layout and each float tensor's largest magnitude.

        One ``aminmax`` pass per float tensor checks finiteness and gives the
        bound of the summed roles.
        """
        device: torch.device | None = None
        layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        largest: dict[str, dict[str, float]] = {r: {} for r, kind in self.tensor_states.items() if kind != "count"}
        first_role = next(iter(self.tensor_states), "")
        for n in names:
            input_dtype = input_dtypes[n]
            for role, kind in self.tensor_states.items():
                key, t = f"{role}.{n}", by_role[role][n]
                if not isinstance(t, Tensor) or t.layout != torch.strided:
                    got = t.layout if isinstance(t, Tensor) else type(t).__name__
                    raise CheckpointError(f"State entry {key!r} must be a dense tensor, got {got}.")
                if t.device.type == "meta":
                    raise CheckpointError(f"State entry {key!r} is on the meta device: it holds no values.")
                device = t.device if device is None else device
                if t.device != device:
                    raise CheckpointError(
                        f"State entry {key!r} is on {t.device}, the other entries on {device}; a merger state "
                        "lives on one device."
                    )
                if kind == "count":
                    expected = torch.int32
                else:
                    expected = accumulate_dtype(input_dtype) if kind == "accumulate" else input_dtype
                if t.dtype != expected:
                    raise CheckpointError(
                        f"State entry {key!r} must be {expected} (role {role!r} is {kind!r} and the input was "
                        f"{input_dtype}), got {t.dtype}."
                    )
                shape = layout.setdefault(n, (tuple(t.shape), input_dtype))[0]
                if tuple(t.shape) != shape:
                    raise CheckpointError(
                        f"State entry {key!r} has shape {tuple(t.shape)}, but {first_role}.{n} has {shape}; "
                        "every role holds one tensor of the same shape per name."
                    )
                if kind != "count":
                    value = max_abs(t)
                    if not math.isfinite(value):
                        n_bad = int((~torch.isfinite(t)).sum())
                        raise CheckpointError(
                            f"State entry {key!r} holds {n_bad} NaN or infinite value(s); a merger state is "
                            "always finite, so this one is corrupt."
                        )
                    largest[role][n] = value
        return layout, largest

    def _checked_scalar(self, key: str, value: object, default: object) -> Any:
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, numbers.Integral):
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif isinstance(default, numbers.Real):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
        else:
            ok = True
        if not ok:
            kind = type(default).__name__ if not isinstance(default, float) else "finite real number"
            raise CheckpointError(
                f"State entry {key!r} must be a {kind}, got {value!r}; the {self.name!r} merger state is corrupt."
            )
        if isinstance(default, bool):
            return value
        if isinstance(default, numbers.Integral):
            return int(value)
        if isinstance(default, numbers.Real):
            return float(value)
        return value

    def _checked_aliases(self, aliases: object, names: list[str]) -> dict[str, str]:
        if not isinstance(aliases, Mapping):
            raise CheckpointError(
                f"State entry 'aliases' must map tied names to canonical names, got {type(aliases).__name__}."
            )
        out = {}
        present = set(names)
        for alias, canonical in aliases.items():
            if not isinstance(alias, str) or not isinstance(canonical, str):
                raise CheckpointError(f"State entry 'aliases' must map names to names, got {alias!r}: {canonical!r}.")
            if alias in present or canonical not in present:
                raise CheckpointError(
                    f"State entry 'aliases' ties {alias!r} to {canonical!r}, but the state "
                    f"{'holds tensors for ' + repr(alias) if alias in present else 'has no tensor ' + repr(canonical)}: "
                    "a tied tensor is saved once, under its canonical name."
                )
            out[alias] = canonical
        return out

    def _check_loaded_state(
        self,
        *,
        num_tasks: int,
        scalars: Mapping[str, Any],
        tensors: Mapping[str, Mapping[str, Tensor]],
        largest: Mapping[str, Mapping[str, float]],
    ) -> None:
        """Method-specific checks of a loaded state; raise :class:`CheckpointError` to refuse it.

        Called by :meth:`load_state_dict` after the generic checks passed
        (keys, types, dtypes, shapes, one device, finite values) and before
        anything is assigned. ``scalars`` are already of their default's type
        and finite; ``tensors`` maps role -> name -> the saved tensor (do not
        modify it); ``largest`` maps each floating-point role -> name -> the
        largest magnitude in that tensor. The default checks nothing more.
        """

    # -- streaming ----------------------------------------------------------------
    def update(self, task_vector: TaskVector | Mapping[str, Tensor], *, fisher: Mapping[str, Tensor] | None = None) -> None:
        """Fold one task's vector into the merged state.

        Args:
            task_vector: a :class:`TaskVector` or any mapping of name to tensor
                (non-float entries are ignored). Every call must carry the same
                names, shapes, dtypes and tied names as the first.
            fisher: only for a method with :attr:`requires_fisher` (``"fisher"``):
                the diagonal Fisher of this task, one non-negative finite
                floating-point tensor per name of ``task_vector`` and of the same
                shape (e.g. from :func:`cl_plugin.merging.fisher.diagonal_fisher`).

        Raises:
            StateDictMismatchError / DtypeMismatchError: the layout or the tied
                names differ from the first task's, or ``fisher``'s names or
                shapes differ from the task vector's.
            NonFiniteError: a tensor (of the task vector or of ``fisher``) holds
                NaN or infinity, DARE's rescaling overflows the dtype, or the
                fold would overflow the state's dtype (finite entries too large
                to sum).
            ConfigError: the task vector is empty; ``fisher`` is missing for a
                method that needs it, given to one that does not use it, or
                holds a negative value.

        Nothing is modified when an error is raised.
        """
        self._check_intact()
        what = f"{self.name!r} merger, task {self.num_tasks + 1}"
        if self.requires_fisher and fisher is None:
            raise ConfigError(
                f"The {self.name!r} merger weighs each task by its diagonal Fisher: call "
                "update(task_vector, fisher={name: F}) with one non-negative tensor per name of the task vector, "
                "e.g. fisher=cl_plugin.merging.fisher.diagonal_fisher(model, batches, loss_fn)."
            )
        if not self.requires_fisher and fisher is not None:
            raise ConfigError(
                f"The {self.name!r} merger does not use a Fisher; drop `fisher`, or use get_merger('fisher') "
                "to weigh the tasks by it."
            )
        if isinstance(task_vector, TaskVector):
            tv = task_vector
        elif self.num_tasks and isinstance(task_vector, Mapping):
            # A plain mapping says nothing about tied names: read it in the first task's terms.
            ties = {a: c for a, c in self._aliases.items() if c in task_vector}
            tv = TaskVector(task_vector, aliases=ties, check_finite=False)
        else:
            tv = TaskVector(task_vector, check_finite=False)
        if len(tv) == 0:
            raise ConfigError(f"{self.name!r} merger: the task vector holds no floating-point tensor.")
        if self.num_tasks:
            check_same_aliases(self._aliases, tv.aliases, what)
            check_same_layout(self._layout, tv, what)
            # Folded in the first task's name order: random draws and sums over
            # tensors must not depend on the order in which a mapping lists its names.
            if list(tv) != list(self._layout):
                tv = TaskVector({n: tv[n] for n in self._layout}, aliases=tv.aliases, check_finite=False)._with_stamp_of(tv)
            device = self.device
            if any(t.device != device for t in tv.values()):
                tv = tv.to(device=device)
        try:
            # Checked here even for a TaskVector: one built with check_finite=False,
            # or by arithmetic that overflowed, can hold inf. The same reduction
            # gives each tensor's largest magnitude for the overflow bound.
            if self.summed_roles or self._dare is not None:
                largest = finite_max_abs(tv, what)
            elif tv._known_finite():  # checked by its maker and not written since: no second pass
                largest = {}
            else:  # no overflow bound to keep: one finiteness check per packed run is enough
                largest = _check_finite_in_runs(tv, what)
            extras: dict[str, Any] = {}
            if self.requires_fisher:
                extras["fisher"] = _checked_fisher(fisher, tv, what)
            if self._dare is not None:
                tv, largest = self._dared(tv, largest, what)
            self._prepare(tv)
            bounds = self._bounds_after_fold(tv, largest, what, extras) if self.num_tasks else None
        except Exception as exc:  # noqa: BLE001 - re-raised after the ranks agree
            self._agree_across_ranks(exc, what)
            raise
        self._agree_across_ranks(None, what)
        with torch.no_grad():
            if not self.num_tasks:
                self._fold_first(tv, largest, extras)
            else:
                self._fold(tv, **extras)
                for (role, n), bound in bounds.items():
                    self._bounds[role][n] = bound
        self.num_tasks += 1

    # -- τ formed chunk by chunk ------------------------------------------------------------------------
    def can_stream(self) -> bool:
        """True when :meth:`update_streamed` applies: :attr:`streams` or :attr:`streams_by_tensor`, without DARE or a Fisher."""
        return (self.streams or self.streams_by_tensor) and self._dare is None and not self.requires_fisher

    def streamed_bounds(self, largest: Mapping[str, float]) -> dict[tuple[str, str], float] | None:
        """The summed roles' bounds after folding a task vector of magnitudes at most ``largest`` (name -> float).

        None when a bound reaches its dtype's maximum: whether that fold
        overflows can then be told only from the whole task vector
        (:meth:`update` computes it exactly). ``{}`` for the first task.
        """
        bounds: dict[tuple[str, str], float] = {}
        if not self.num_tasks:
            return bounds
        for role in self.summed_roles:
            for n, value in largest.items():
                info = torch.finfo(self._state[role][n].dtype)
                bound = (self._bounds[role][n] + value) * (1.0 + 4.0 * info.eps)
                if not bound <= info.max:
                    return None
                bounds[(role, n)] = bound
        return bounds

    def update_streamed(
        self,
        theta0: Mapping[str, Tensor],
        live: Mapping[str, Tensor],
        largest: Mapping[str, float],
        bounds: Mapping[tuple[str, str], float],
        observe: Callable[[Tensor], None] | None = None,
    ) -> None:
        """Fold τ = ``live`` − ``theta0`` without forming it whole: one chunk at a time inside the fold.

        For the boundary core, which has already checked τ: it is finite, its
        magnitudes are at most ``largest``, and ``bounds`` is what
        :meth:`streamed_bounds` returned for them (not None). The result is
        :meth:`update` on the whole τ, bit for bit: the chunks are rounded as
        ``torch.sub`` rounds τ, and the rule is elementwise. Memory: one chunk
        (:data:`cl_plugin._packed.STREAM_CHUNK_NUMEL` elements) besides the state.

        Args:
            theta0: θ₀ per name (packed, as the core keeps it); folded in the first task's order.
            live: the weights per name, same shapes and dtypes (any layout and device).
            largest, bounds: see above.
            observe: called with each chunk of τ (e.g. to accumulate its norm).

        Raises:
            ConfigError: the method cannot stream (:meth:`can_stream`).
            StateDictMismatchError: the names, shapes or dtypes differ from the first task's.
        """
        if not self.can_stream():
            raise ConfigError(
                f"The {self.name!r} merger cannot fold a task vector chunk by chunk (DARE, a Fisher, or a rule that "
                "is not elementwise): call update(task_vector)."
            )
        self._check_intact()
        names = list(theta0)
        what = f"{self.name!r} merger, task {self.num_tasks + 1}"
        if not names:
            raise ConfigError(f"{self.name!r} merger: the task vector holds no floating-point tensor.")
        if self.num_tasks:
            check_same_layout(self._layout, theta0, what)
            names = list(self._layout)  # the first task's order, as update() folds (e.g. after a load)
        first = not self.num_tasks
        saved = (self._layout, self._state, self._aliases)
        ordered = {n: theta0[n] for n in names}
        bases, lives = list(ordered.values()), [live[n] for n in names]
        self._prepare_streamed(ordered, lambda: (chunk for (chunk,) in difference_chunks([], bases, lives)))
        try:
            if first:
                self._layout = {n: (tuple(t.shape), t.dtype) for n, t in theta0.items()}
                self._aliases = {}
                self._state = self._allocated(theta0)
            with torch.no_grad():
                if self.streams_by_tensor:
                    self._fold_difference(_Difference(ordered, live, self.device, observe))
                else:
                    self._fold_in_chunks(first, names, bases, lives, observe)
        except BaseException:
            if first:
                self._layout, self._state, self._aliases = saved
            else:
                self._damaged = True  # part of the chunks are folded: no state to go back to
            raise
        if first:
            self._bounds = {role: {n: float(largest[n]) for n in names} for role in self.summed_roles}
        else:
            for (role, n), bound in bounds.items():
                self._bounds[role][n] = bound
        self.num_tasks += 1

    def _fold_in_chunks(
        self,
        first: bool,
        names: list[str],
        bases: list[Tensor],
        lives: list[Tensor],
        observe: Callable[[Tensor], None] | None,
    ) -> None:
        """Fold τ = ``lives`` − ``bases`` chunk by chunk with :meth:`_fold_chunk` (see :meth:`update_streamed`)."""
        positional = self.chunk_pieces
        for *state, incoming in difference_chunks(
            [[self._state[role][n] for n in names] for role in self.tensor_states], bases, lives, pieces=positional
        ):
            extras = {}
            if positional:
                extras["pieces"] = [(names[k], offset, length) for k, offset, length in incoming]
                *state, incoming = state
            if observe is not None:
                observe(incoming)
            if incoming.device != state[0].device:  # θ₀ and the state on different devices (e.g. after a resume)
                incoming = incoming.to(state[0].device)
            self._fold_chunk(first, *state, incoming, **extras)

    def _fold_difference(self, difference: Mapping[str, Tensor]) -> None:
        """For a method that :attr:`streams_by_tensor`: fold τ, whose tensors ``difference[name]`` forms when read.

        Read each tensor once (every read forms it again); the state is
        allocated (zero for the first task) and written in place.
        """
        raise NotImplementedError

    def _fold_chunk(self, first: bool, *views: Tensor) -> None:
        """For a method that :attr:`streams`: fold one chunk, ``views`` = (a flat view of each state role, in
        :attr:`tensor_states` order, then the chunk of τ); ``first`` is True for the first task (state zero)."""
        raise NotImplementedError

    def _prepare_streamed(self, theta0: Mapping[str, Tensor], passes: Callable[[], Iterable[Tensor]]) -> None:
        """Before a streamed fold, on every rank: what the rule needs from the whole τ first (TIES: its threshold).

        ``passes()`` yields τ's chunks afresh at each call (each read forms
        them again from the weights); ``theta0`` are the tensors they cover.
        """

    def _check_intact(self) -> None:
        """Raise if a fold was interrupted part-way (its state holds part of a task): nothing may use or save it."""
        if self._damaged:
            raise ConfigError(
                f"The {self.name!r} merger's last fold was interrupted part-way (an error inside the fold itself, e.g. "
                "out of memory), so its state holds part of a task. It cannot be used or saved: resume from the last "
                "checkpoint, or reset() it."
            )

    def _prepare(self, tv: TaskVector) -> None:
        """Work that every rank does for ``tv`` before the checks and the fold (e.g. a collective statistic)."""

    def _agree_across_ranks(self, error: Exception | None, what: str) -> None:
        """In a sharded merge, raise on every rank when a check failed on any (each rank checks its own slices).

        Without it one rank would refuse a task that the others fold, and the
        ranks' states would part. No-op on one process.
        """
        if self.layout is not None and self.layout.any_rank(error is not None) and error is None:
            raise NonFiniteError(
                f"{what}: another rank refused its slice of this task vector (see its error); nothing was "
                "changed on any rank."
            )

    def _dared(self, tv: TaskVector, largest: Mapping[str, float], what: str) -> tuple[TaskVector, dict[str, float]]:
        """DARE applied to ``tv`` (a new TaskVector) and an upper bound of its magnitudes; NonFiniteError on overflow."""
        from cl_plugin.merging.dare import dare_task_vector

        p = self._dare
        layout = self.layout
        offsets = {n: layout[n].start for n in tv} if layout is not None and layout.distributed else None
        dared = dare_task_vector(tv, p, seed=self._dare_seed, task=self.num_tasks, offsets=offsets)
        bound: dict[str, float] = {}
        for n, t in dared.items():
            # A kept entry is x / (1 - p), rounded once: at most |x| / (1 - p) · (1 + eps).
            value = largest[n] / (1.0 - p) * (1.0 + 2.0 * torch.finfo(t.dtype).eps)
            if value >= torch.finfo(t.dtype).max:
                value = finite_max_abs({n: t}, f"{what}, after DARE's rescaling by 1/(1 - {p:g})")[n]
            bound[n] = value
        return dared, bound

    def _fold_first(self, tv: TaskVector, largest: Mapping[str, float], extras: Mapping[str, Any] | None = None) -> None:
        """Allocate the state for ``tv`` and fold it; on failure restore the empty merger exactly."""
        extras = extras or {}
        saved = (self._layout, self._state, dict(self._scalars), self._aliases, self._bounds)
        try:
            self._layout = {n: (tuple(t.shape), t.dtype) for n, t in tv.items()}
            self._aliases = dict(tv.aliases)
            self._state = self._allocated(tv)
            self._fold(tv, **extras)
        except BaseException:
            self._layout, self._state, self._scalars, self._aliases, self._bounds = saved
            raise
        # Folding into zeros: every summed role holds at most what the task brings.
        incoming = self._incoming_max_abs(tv, largest, **extras)
        self._bounds = {role: {n: incoming[role][n] for n in tv} for role in self.summed_roles}

    def _incoming_max_abs(self, tv: TaskVector, largest: Mapping[str, float], **extras: Any) -> dict[str, dict[str, float]]:
        """An upper bound of the magnitudes that folding ``tv`` adds to each summed role: role -> name -> float.

        ``largest`` holds each tensor's largest magnitude. The default, for a
        fold that adds (part of) the incoming entries themselves, is ``largest``
        for every role; a method that adds something else (the Fisher merger
        adds w·F·τ and w·F) overrides it.
        """
        return {role: dict(largest) for role in self.summed_roles}

    def _bounds_after_fold(
        self, tv: TaskVector, largest: Mapping[str, float], what: str, extras: Mapping[str, Any] | None = None
    ) -> dict[tuple[str, str], float]:
        """The summed roles' bounds after folding ``tv``; raise NonFiniteError if the fold would overflow.

        |s + x| <= |s| + |x| bounds a sum before rounding; the factor
        (1 + 4·eps) covers the rounding of the state's dtype and of the bound
        itself (a double). Only where that bound passes the dtype's maximum is
        the fold computed exactly, out of place (:meth:`_fold_max_abs`).
        """
        extras = extras or {}
        incoming = self._incoming_max_abs(tv, largest, **extras) if self.summed_roles else {}
        bounds: dict[tuple[str, str], float] = {}
        unsure: list[tuple[str, str]] = []
        for role in self.summed_roles:
            for n, value in incoming[role].items():
                info = torch.finfo(self._state[role][n].dtype)
                bound = (self._bounds[role][n] + value) * (1.0 + 4.0 * info.eps)
                if bound <= info.max:
                    bounds[(role, n)] = bound
                else:
                    unsure.append((role, n))
        if unsure:
            for (role, n), value in self._fold_max_abs(tv, unsure, **extras).items():
                if not math.isfinite(value):
                    dtype = str(self._state[role][n].dtype).removeprefix("torch.")
                    raise NonFiniteError(
                        f"{what}: folding tensor {n!r} would overflow {dtype} in the {role!r} state: the task vector "
                        f"is finite, but its entries are too large to add to the {self.num_tasks} task(s) folded so "
                        "far. Nothing was changed. Scale the task vectors down, or merge in float64 from the first "
                        "task (task_vector.to(dtype=torch.float64))."
                    )
                bounds[(role, n)] = value
        return bounds

    def _fold_max_abs(self, tv: TaskVector, keys: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """The largest magnitude each ``(role, name)`` in ``keys`` would hold after folding ``tv``.

        Computed out of place, exactly as :meth:`_fold` would (NaN or inf where
        the fold would overflow); the state is not modified. The default is for
        a summed role that adds the whole incoming tensor; a method whose fold
        adds only part of it overrides this (and receives ``fisher=`` when it
        has :attr:`requires_fisher`).
        """
        return {(role, n): max_abs(torch.add(self._state[role][n], tv[n])) for role, n in keys}

    def merged(self) -> TaskVector:
        """The merged task vector so far, unscaled, in the inputs' dtypes, with the tied names of the inputs.

        Raises:
            ConfigError: no task has been folded yet.
            NonFiniteError: a merged value kept in float32 for 16-bit inputs
                overflows the input dtype (e.g. a float16 sum beyond 65504);
                the state is unchanged.
        """
        self._check_intact()
        if not self.num_tasks:
            raise ConfigError(f"The {self.name!r} merger has no task yet; call update(task_vector) first.")
        with torch.no_grad():
            out = {n: self._in_input_dtype(n, t) for n, t in self._finalize().items()}
        return TaskVector(out, aliases=self._aliases, check_finite=False)

    def _in_input_dtype(self, n: str, t: Tensor) -> Tensor:
        """Merged tensor ``n`` cast to its input dtype; NonFiniteError if the cast overflows."""
        dtype = self._layout[n][1]
        if t.dtype == dtype:
            return t
        cast = t.to(dtype)
        if not is_finite(cast):
            short = str(dtype).removeprefix("torch.")
            raise NonFiniteError(
                f"The {self.name!r} merger, tensor {n!r}: the merged value overflows {short}; its largest "
                f"magnitude is {max_abs(t):.6g} and {short} holds at most {torch.finfo(dtype).max:g}. The "
                f"merger's state (kept in {str(t.dtype).removeprefix('torch.')}) is unchanged. Fold "
                "task vectors in float32 from the first task (task_vector.to(dtype=torch.float32)), or use a "
                "method whose result stays in the inputs' range (e.g. 'average')."
            )
        return cast

    def merged_one(self, name: str) -> Tensor:
        """Merged tensor ``name`` alone, in its input dtype, as :meth:`merged` gives it; read-only.

        For a method that finalises tensor by tensor (:meth:`_finalize_one`)
        only that tensor is computed (at most one tensor's worth of memory);
        otherwise it is taken from :meth:`merged_view`. Valid until the next update.

        Raises:
            ConfigError: no task has been folded yet.
            NonFiniteError: see :meth:`merged`.
        """
        self._check_intact()
        if not self.num_tasks:
            raise ConfigError(f"The {self.name!r} merger has no task yet; call update(task_vector) first.")
        if not self._finalizes_by_tensor_now():
            return self.merged_view()[name]
        with torch.no_grad():
            return self._in_input_dtype(name, self._finalize_one(name))

    def merged_source(self) -> Callable[[str], Tensor]:
        """name -> merged tensor, for reading the merge one tensor at a time: :meth:`merged_one` where the method
        finalises tensor by tensor, else one :meth:`merged_view` taken now. Valid until the next update."""
        if self._finalizes_by_tensor_now():
            return self.merged_one
        return self.merged_view().__getitem__

    def _finalizes_by_tensor_now(self) -> bool:
        """Whether :meth:`_finalize_one` can serve now (e.g. TIES: once it knows the whole vector's majority sign)."""
        return self.finalizes_by_tensor

    def _finalize_one(self, name: str) -> Tensor:
        """For a method that :attr:`finalizes_by_tensor`: ``_finalize()[name]`` alone (a view of the state is fine)."""
        raise NotImplementedError

    def merged_view(self) -> Mapping[str, Tensor]:
        """The merged task vector without copying it where the state already is it (MagMax, OPCM, random, DOP
        with the inputs' dtypes): read-only views of the live state, valid until the next update. Other methods
        (and 16-bit inputs kept in float32) return :meth:`merged`.
        """
        self._check_intact()
        if not self.num_tasks:
            raise ConfigError(f"The {self.name!r} merger has no task yet; call update(task_vector) first.")
        state = self._state.get(self.merged_role) if self.merged_role else None
        if state is not None and all(state[n].dtype == self._layout[n][1] for n in state):
            return state
        return self.merged()

    def merged_norm(self) -> float:
        """‖merged()‖ over all tensors (a tied tensor once), without copying the state where the method allows it
        (or one tensor at a time, for a method that finalises tensor by tensor)."""
        self._check_intact()
        if not self.num_tasks:
            raise ConfigError(f"The {self.name!r} merger has no task yet; call update(task_vector) first.")
        with torch.no_grad():
            if self.merged_role:
                return TaskVector(self._state[self.merged_role], check_finite=False).norm()
            if self._finalizes_by_tensor_now():
                return norm_of_norms(tensor_norm(self._finalize_one(n)) for n in self._layout)
            return TaskVector(self._finalize(), check_finite=False).norm()

    def apply_to(self, base: StateDictLike, scale: float | None = None):
        """``base + scale · merged()``; ``scale=None`` uses :attr:`scale`. See :meth:`TaskVector.apply_to`.

        Raises:
            ConfigError: ``scale`` is out of (0, 10], or no task has been folded.
            NonFiniteError: see :meth:`merged`.
            StateDictMismatchError: see :meth:`TaskVector.apply_to`.
        """
        value = self.scale if scale is None else check_scale(scale, f"{type(self).__name__}.apply_to")
        return self.merged().apply_to(base, value)

    # -- to implement ---------------------------------------------------------------
    def _fold(self, tv: TaskVector) -> None:
        """Fold ``tv`` into ``self._state`` (a method with :attr:`requires_fisher` also receives ``fisher=``)."""
        raise NotImplementedError

    def _copy_first_task(self, tv: TaskVector, role: str = "merged") -> bool:
        """Before any task is folded, state ``role`` becomes ``tv`` itself: copy it in and return True; else False."""
        if self.num_tasks:
            return False
        for state, incoming in self._runs(tv, role):
            state.copy_(incoming)
        return True

    def _finalize(self) -> dict[str, Tensor]:
        raise NotImplementedError


_MISSING = object()


class _Difference(Mapping[str, Tensor]):
    """τ = ``live`` − ``theta0`` per name, formed (rounded as ``torch.sub`` rounds it) each time a tensor is read.

    ``observe`` sees each tensor's τ, flattened, the first time it is read.
    """

    def __init__(
        self,
        theta0: Mapping[str, Tensor],
        live: Mapping[str, Tensor],
        device: torch.device,
        observe: Callable[[Tensor], None] | None,
    ) -> None:
        self._theta0, self._live, self._device, self._observe = theta0, live, device, observe
        self._seen: set[str] = set()

    def __getitem__(self, name: str) -> Tensor:
        base = self._theta0[name]
        tau = torch.sub(self._live[name].to(base.device), base)
        if self._observe is not None and name not in self._seen:
            self._seen.add(name)
            self._observe(tau.reshape(-1))
        return tau.to(self._device)

    def __iter__(self):
        return iter(self._theta0)

    def __len__(self) -> int:
        return len(self._theta0)


def _check_finite_in_runs(tv: TaskVector, what: str) -> dict[str, float]:
    """Raise NonFiniteError naming the first tensor of ``tv`` with NaN or inf; return no bounds (``{}``).

    One reduction per packed run (:func:`~cl_plugin._packed.aligned_runs`)
    instead of one per tensor; only a run that fails is searched tensor by tensor.
    """
    for (flat,) in aligned_runs(list(tv.values())):
        if not math.isfinite(max_abs(flat)):
            finite_max_abs(tv, what)
    return {}


def _float_dtype(name: str, value: object) -> torch.dtype:
    """The floating-point dtype that ``input_dtypes[name]`` names, or CheckpointError."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(
            f"State entry 'input_dtypes' names {value!r} for {name!r}; expected a floating-point dtype "
            "such as 'float32', 'float16', 'bfloat16' or 'float64'."
        )
    return dtype


def check_fraction(value: object, name: str, owner: str, *, low: float = 0.0, high: float = 1.0, low_open=True) -> float:
    """Return ``value`` as a float in (low, high] (or [low, high]), else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"`{name}` must be a real number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r} ({owner}).")
    v = float(value)
    if (v <= low if low_open else v < low) or v > high:
        raise ConfigError(f"`{name}` must be a real number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r} ({owner}).")
    return v


def _checked_fisher(fisher: object, tv: TaskVector, what: str) -> dict[str, Tensor]:
    """``fisher`` checked against ``tv``: one finite, non-negative float tensor per name, same shapes.

    Returns the tensors in ``tv``'s name order, on its devices; a name that
    ``tv`` ties to another (an alias) may be present and is ignored.
    """
    if not isinstance(fisher, Mapping):
        raise ConfigError(f"{what}: `fisher` must map tensor names to tensors, got {type(fisher).__name__}.")
    aliases = tv.aliases
    picked = {k: v for k, v in fisher.items() if k not in aliases}
    for name, value in picked.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(f"{what}: `fisher[{name!r}]` must be a floating-point tensor, got {got}.")
    check_same_layout(tv, picked, f"{what}, its `fisher`", check_dtype=False)
    out: dict[str, Tensor] = {}
    for name, t in tv.items():
        f = picked[name].detach()
        if f.device != t.device:
            f = f.to(t.device)
        if f.numel():
            low, high = (float(v) for v in torch.aminmax(f))
            if not (math.isfinite(low) and math.isfinite(high)):
                n_bad = int((~torch.isfinite(f)).sum())
                raise NonFiniteError(f"{what}: `fisher[{name!r}]` holds {n_bad} NaN or infinite value(s).")
            if low < 0:
                raise ConfigError(
                    f"{what}: `fisher[{name!r}]` holds negative values (down to {low:.6g}); a diagonal Fisher is a "
                    "mean of squared gradients, so every entry is >= 0."
                )
        out[name] = f
    return out
