"""The streaming merger interface shared by every merging method.

A merger folds one task vector at a time into a fixed-size state and can
return the merged task vector at any point. Its state is declared once per
class (:attr:`Merger.tensor_states`, :attr:`Merger.scalar_states`); ``reset``,
``state_dict`` and ``load_state_dict`` are derived from that declaration, so a
method cannot forget to checkpoint a field.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from cl_plugin._checks import check_finite, check_same_layout, check_scale
from cl_plugin.errors import ConfigError, StateDictMismatchError, preview
from cl_plugin.task_vectors import StateDictLike, TaskVector

__all__ = ["Merger", "accumulate_dtype"]

STATE_FORMAT_VERSION = 1


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a running sum of ``dtype`` values is kept in.

    16-bit floats lose most of their mantissa when many task vectors are
    summed, so their sums are kept in float32; wider floats are kept as they are.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Merger:
    """Base class of the streaming mergers.

    Subclasses set :attr:`name`, :attr:`default_scale`, :attr:`tensor_states`
    and :attr:`scalar_states`, and implement :meth:`_fold` and :meth:`_finalize`.

    Args:
        scale: the factor λ that :meth:`apply_to` uses; ``None`` means the
            method's :attr:`default_scale`. Must be in (0, 10].

    The state is allocated on the device of the first task vector and every
    later task vector is moved there.
    """

    name: ClassVar[str] = ""
    default_scale: ClassVar[float] = 1.0
    #: Per-parameter tensor states: role -> "accumulate" (float32 for 16-bit
    #: inputs), "same" (the input dtype) or "count" (an integer counter).
    tensor_states: ClassVar[dict[str, str]] = {}
    #: Scalar states: name -> default value (plain Python numbers).
    scalar_states: ClassVar[dict[str, Any]] = {}
    #: The tensor-state role that already is the merged vector (no finalisation
    #: needed), or None.
    merged_role: ClassVar[str | None] = None

    def __init__(self, *, scale: float | None = None) -> None:
        self._scale = None if scale is None else check_scale(scale, f"{type(self).__name__}")
        self.reset()

    # -- configuration ------------------------------------------------------
    @property
    def scale(self) -> float:
        """The scale :meth:`apply_to` uses (the method's default unless one was given)."""
        return self.default_scale if self._scale is None else self._scale

    def options(self) -> dict[str, Any]:
        """The method-specific options, as passed to the constructor (for checkpoints)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts + ', ' if opts else ''}scale={self.scale}, num_tasks={self.num_tasks})"

    # -- state -----------------------------------------------------------------
    def reset(self) -> None:
        """Forget every task folded so far."""
        self.num_tasks = 0
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._state: dict[str, dict[str, Tensor]] = {role: {} for role in self.tensor_states}
        self._scalars: dict[str, Any] = dict(self.scalar_states)

    def _allocate(self, tv: TaskVector) -> None:
        for role, kind in self.tensor_states.items():
            for n, t in tv.items():
                if kind == "count":
                    self._state[role][n] = torch.zeros(t.shape, dtype=torch.int32, device=t.device)
                else:
                    dtype = accumulate_dtype(t.dtype) if kind == "accumulate" else t.dtype
                    self._state[role][n] = torch.zeros(t.shape, dtype=dtype, device=t.device)

    @property
    def device(self) -> torch.device | None:
        """Where the state lives (None before the first update)."""
        for tensors in self._state.values():
            for t in tensors.values():
                return t.device
        return None

    def state_dict(self) -> dict[str, Any]:
        """A flat dict: ``format_version``, ``method``, ``options``, ``scale``,
        ``num_tasks``, the scalar states, and one tensor per ``"<role>.<name>"``.

        The tensors are the live state, not copies; clone them if the merger
        will keep updating after you store the dict in memory.
        """
        out: dict[str, Any] = {
            "format_version": STATE_FORMAT_VERSION,
            "method": self.name,
            "options": self.options(),
            "scale": self._scale,
            "num_tasks": self.num_tasks,
            "input_dtypes": {n: str(dtype).removeprefix("torch.") for n, (_, dtype) in self._layout.items()},
        }
        out.update(self._scalars)
        for role, tensors in self._state.items():
            for n, t in tensors.items():
                out[f"{role}.{n}"] = t
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`, continuing the stream exactly.

        Raises:
            ConfigError: the state is of another method, format or options.
            StateDictMismatchError: required keys are missing or unknown keys present.
        """
        if not isinstance(state, Mapping):
            raise ConfigError(f"load_state_dict expects a mapping, got {type(state).__name__}.")
        method = state.get("method")
        if method != self.name:
            raise ConfigError(
                f"This state belongs to the merger {method!r}, not {self.name!r}. "
                f"Create it with get_merger({method!r}, ...) instead."
            )
        version = state.get("format_version", STATE_FORMAT_VERSION)
        if version > STATE_FORMAT_VERSION:
            raise ConfigError(
                f"The state has format_version {version}, newer than this cl-plugin understands "
                f"({STATE_FORMAT_VERSION}); upgrade cl-plugin."
            )
        options = dict(state.get("options", {}))
        if options != self.options():
            raise ConfigError(
                f"The saved {self.name!r} merger used options {options}, this one has {self.options()}. "
                f"Create the merger with get_merger({self.name!r}, **{options}) to resume it."
            )
        required = {"num_tasks", *self.scalar_states}
        missing = sorted(k for k in required if k not in state)
        meta = {"format_version", "method", "options", "scale", "num_tasks", "input_dtypes", *self.scalar_states}
        tensor_keys = [k for k in state if k not in meta]
        unexpected = [k for k in tensor_keys if k.split(".", 1)[0] not in self.tensor_states or "." not in k]
        # ``input_dtypes`` names every tensor the saved merger held: each role needs them all.
        input_dtypes = state.get("input_dtypes", {})
        present = set(tensor_keys)
        missing += [f"{role}.{n}" for role in self.tensor_states for n in input_dtypes if f"{role}.{n}" not in present]
        if missing or unexpected:
            raise StateDictMismatchError(
                f"Cannot load the {self.name!r} merger state: missing keys [{preview(missing)}], "
                f"unexpected keys [{preview(unexpected)}]."
            )
        new_state: dict[str, dict[str, Tensor]] = {role: {} for role in self.tensor_states}
        for k in tensor_keys:
            role, n = k.split(".", 1)
            if not isinstance(state[k], Tensor):
                raise ConfigError(f"State entry {k!r} must be a tensor, got {type(state[k]).__name__}.")
            new_state[role][n] = state[k]
        names = [list(t) for t in new_state.values()]
        if any(set(n) != set(names[0]) for n in names):
            raise StateDictMismatchError(f"The {self.name!r} merger state has different names per role; it is corrupt.")
        num_tasks = int(state["num_tasks"])
        if num_tasks > 0 and not names[0]:
            raise StateDictMismatchError(f"The state says {num_tasks} task(s) were folded but holds no tensors.")
        first_role = next(iter(self.tensor_states))
        layout = {}
        for n, t in new_state[first_role].items():
            dtype = getattr(torch, input_dtypes[n], None) if n in input_dtypes else t.dtype
            if not isinstance(dtype, torch.dtype):
                raise StateDictMismatchError(f"State entry 'input_dtypes' names an unknown dtype {input_dtypes[n]!r} for {n!r}.")
            layout[n] = (tuple(t.shape), dtype)
        # Nothing is assigned before every check has passed.
        self._state = {role: {n: t.clone() for n, t in tensors.items()} for role, tensors in new_state.items()}
        self._layout = layout
        self._scalars = {k: state[k] for k in self.scalar_states}
        self._scale = state.get("scale", self._scale)
        self.num_tasks = num_tasks

    # -- streaming ----------------------------------------------------------------
    def update(self, task_vector: TaskVector | Mapping[str, Tensor]) -> None:
        """Fold one task's vector into the merged state.

        Args:
            task_vector: a :class:`TaskVector` or any mapping of name to tensor
                (non-float entries are ignored). Every call must carry the same
                names, shapes and dtypes as the first.

        Raises:
            StateDictMismatchError / DtypeMismatchError: the layout differs from the first task's.
            NonFiniteError: a tensor holds NaN or infinity.
            ConfigError: the task vector is empty.

        Nothing is modified when an error is raised.
        """
        tv = task_vector if isinstance(task_vector, TaskVector) else TaskVector(task_vector, check_finite=False)
        if len(tv) == 0:
            raise ConfigError(f"{self.name!r} merger: the task vector holds no floating-point tensor.")
        if self.num_tasks:
            check_same_layout(self._layout, tv, f"{self.name!r} merger, task {self.num_tasks + 1}")
            # Folded in the first task's name order: random draws and sums over
            # tensors must not depend on the order in which a mapping lists its names.
            if list(tv) != list(self._layout):
                tv = TaskVector({n: tv[n] for n in self._layout}, check_finite=False)
            device = self.device
            if any(t.device != device for t in tv.values()):
                tv = tv.to(device=device)
        # Checked here even for a TaskVector: one built with check_finite=False,
        # or by arithmetic that overflowed, can hold inf.
        check_finite(tv, f"{self.name!r} merger, task {self.num_tasks + 1}")
        with torch.no_grad():
            if not self.num_tasks:
                self._layout = {n: (tuple(t.shape), t.dtype) for n, t in tv.items()}
                self._allocate(tv)
            self._fold(tv)
        self.num_tasks += 1

    def merged(self) -> TaskVector:
        """The merged task vector so far, unscaled, in the inputs' dtypes.

        Raises:
            ConfigError: no task has been folded yet.
        """
        if not self.num_tasks:
            raise ConfigError(f"The {self.name!r} merger has no task yet; call update(task_vector) first.")
        with torch.no_grad():
            out = self._finalize()
        out = {n: t if t.dtype == self._layout[n][1] else t.to(self._layout[n][1]) for n, t in out.items()}
        return TaskVector(out, check_finite=False)

    def merged_norm(self) -> float:
        """‖merged()‖ over all tensors, without copying the state where the method allows it."""
        if not self.num_tasks:
            raise ConfigError(f"The {self.name!r} merger has no task yet; call update(task_vector) first.")
        with torch.no_grad():
            tensors = self._state[self.merged_role] if self.merged_role else self._finalize()
            return TaskVector(tensors, check_finite=False).norm()

    def apply_to(self, base: StateDictLike, scale: float | None = None):
        """``base + scale · merged()``; ``scale=None`` uses :attr:`scale`. See :meth:`TaskVector.apply_to`."""
        value = self.scale if scale is None else check_scale(scale, f"{type(self).__name__}.apply_to")
        return self.merged().apply_to(base, value)

    # -- to implement ---------------------------------------------------------------
    def _fold(self, tv: TaskVector) -> None:
        raise NotImplementedError

    def _finalize(self) -> dict[str, Tensor]:
        raise NotImplementedError


def check_fraction(value: object, name: str, owner: str, *, low: float = 0.0, high: float = 1.0, low_open=True) -> float:
    """Return ``value`` as a float in (low, high] (or [low, high]), else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"`{name}` must be a real number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r} ({owner}).")
    v = float(value)
    if (v <= low if low_open else v < low) or v > high:
        raise ConfigError(f"`{name}` must be a real number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r} ({owner}).")
    return v
