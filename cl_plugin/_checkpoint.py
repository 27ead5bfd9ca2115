"""Checks that every saved cl-plugin state goes through before it is loaded.

A ``load_state_dict`` (the callbacks', the boundary core's) first reads the
whole saved state through these functions, which raise and never assign, and
only then changes anything (see ``TaskBoundaryCallback.load_state_dict``).
No Lightning import. Two kinds of error come out:

* :class:`~cl_plugin.errors.CheckpointError`: the state is corrupt, of an
  unknown format version, inconsistent with itself, or does not fit the model;
* :class:`~cl_plugin.errors.ConfigError`: the state is sound but was written
  with other options than the callback has now (each difference is named).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from cl_plugin._checks import is_finite
from cl_plugin._distributed_checkpoint import is_dtensor
from cl_plugin.errors import CheckpointError, ConfigError, preview

__all__ = [
    "Layout",
    "check_bool_field",
    "check_count",
    "check_format_version",
    "check_options",
    "check_tensor_dict",
    "layout_of",
    "read",
]

#: name -> (shape, dtype) of the tensors a state must hold.
Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def layout_of(tensors: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The :data:`Layout` of a mapping of tensors."""
    return {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}


def read(state: Mapping[str, Any], key: str, owner: str) -> Any:
    """``state[key]``, or a CheckpointError naming the missing key."""
    if key not in state:
        raise CheckpointError(
            f"The checkpoint's {owner} state has no {key!r} entry (it has {preview(sorted(map(str, state)), 8)}); "
            "it is damaged or was not written by cl-plugin. Resume from another checkpoint or start the stream again."
        )
    return state[key]


def check_format_version(state: Mapping[str, Any], owner: str, supported: int) -> int:
    """The state's ``format_version`` (missing means 1); raise unless it is an int in ``[1, supported]``."""
    version = state.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"The checkpoint's {owner} state has format_version={version!r}; expected an integer >= 1.")
    if version > supported:
        raise CheckpointError(
            f"The checkpoint's {owner} state has format_version={version}, newer than this cl-plugin reads "
            f"({supported}). Upgrade cl-plugin to resume it."
        )
    return version


def check_count(value: object, key: str, owner: str, *, low: int = 0, high: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int in ``[low, high]`` (or None when ``optional``), else CheckpointError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise CheckpointError(
            f"The checkpoint's {owner} state has {key}={value!r}; expected {allowed}{' or None' if optional else ''}. "
            "The checkpoint is damaged."
        )
    return int(value)


def check_bool_field(value: object, key: str, owner: str) -> bool:
    """``value`` if it is exactly True or False, else CheckpointError."""
    if not isinstance(value, bool):
        raise CheckpointError(f"The checkpoint's {owner} state has {key}={value!r}; expected True or False.")
    return value


def check_fingerprint(value: object, key: str, owner: str) -> list[float] | None:
    """None or a list of finite floats (a parameter fingerprint)."""
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)) for v in value)
    ):
        raise CheckpointError(f"The checkpoint's {owner} state has {key}={value!r}; expected None or a list of finite numbers.")
    return [float(v) for v in value]


def check_tensor_dict(
    value: object,
    key: str,
    owner: str,
    layout: Layout | None = None,
    *,
    names: Iterable[str] | None = None,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """A dict of finite tensors with exactly ``layout``'s (or ``names``') names, shapes and dtypes.

    Returns new tensors on ``device`` (the inputs are not kept), so the caller
    can assign them once every other check has passed. A ``DTensor`` (this
    rank's shard, read back from a distributed checkpoint) is checked by its
    global shape and its local values and returned as it is.
    """
    if not isinstance(value, Mapping):
        raise CheckpointError(f"The checkpoint's {owner} state has {key} of type {type(value).__name__}; expected a mapping of name to tensor.")
    expected = list(layout) if layout is not None else (list(names) if names is not None else None)
    if expected is not None:
        missing = [n for n in expected if n not in value]
        unexpected = [n for n in value if n not in set(expected)]
        if missing or unexpected:
            raise CheckpointError(
                f"The checkpoint's {owner} {key} does not fit this model: missing {len(missing)} tensor(s) "
                f"[{preview(missing)}], unexpected {len(unexpected)} [{preview(unexpected)}]. Resume with the model "
                "(and the `exclude` patterns) the checkpoint was written with."
            )
    out = {}
    for name, tensor in value.items():
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"The checkpoint's {owner} {key}[{name!r}] is a {type(tensor).__name__}, not a tensor.")
        if layout is not None:
            shape, dtype = layout[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(
                    f"The checkpoint's {owner} {key}[{name!r}] is {tuple(tensor.shape)} {tensor.dtype}, the model's "
                    f"tensor is {tuple(shape)} {dtype}. Resume with the model (architecture and dtype) the "
                    "checkpoint was written with."
                )
        if is_dtensor(tensor):
            # This rank's rows, read back from a distributed checkpoint into fresh memory: checked
            # here, kept as they are (the boundary core cuts and places them).
            if not is_finite(tensor.to_local()):
                raise CheckpointError(
                    f"The checkpoint's {owner} {key}[{name!r}] holds NaN or infinite values in this rank's shard: the "
                    "checkpoint is damaged. Resume from an earlier checkpoint."
                )
            out[name] = tensor
            continue
        if tensor.is_floating_point() and not is_finite(tensor):
            raise CheckpointError(
                f"The checkpoint's {owner} {key}[{name!r}] holds NaN or infinite values: the checkpoint is damaged. "
                "Resume from an earlier checkpoint."
            )
        out[name] = tensor.detach().to(device=device if device is not None else tensor.device, copy=True)
    return out


def check_options(saved: Mapping[str, Any], current: Mapping[str, Any], owner: str, changeable: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Compare the options a state was written with against the callback's.

    Options in ``changeable`` may differ (they are returned as ``name ->
    (saved, current)`` for the caller to report); any other difference raises a
    ConfigError naming every one. An option the state does not record is not
    compared (states written before the option existed).
    """
    changeable = set(changeable)
    fixed, changed = [], {}
    for name, value in current.items():
        if name not in saved or saved[name] == value:
            continue
        if name in changeable:
            changed[name] = (saved[name], value)
        else:
            fixed.append(f"{name}: checkpoint {saved[name]!r}, now {value!r}")
    if fixed:
        raise ConfigError(
            f"The checkpoint's {owner} was written with other options, and resuming would silently mix two runs: "
            + "; ".join(fixed)
            + f". Resume with the checkpoint's values, or start a new stream without `ckpt_path`."
        )
    return changed
