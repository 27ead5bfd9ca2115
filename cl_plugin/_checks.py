"""Checks shared by task vectors and mergers.

Each check reads its inputs and raises before anything is written, so a caller
that runs the checks first never leaves a half-updated state behind.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from cl_plugin.errors import (
    ConfigError,
    DtypeMismatchError,
    NonFiniteError,
    StateDictMismatchError,
    preview,
)


def is_finite(tensor: Tensor) -> bool:
    """True when no element of ``tensor`` is NaN or infinite.

    A single reduction decides the common case without allocating a mask the
    size of the tensor: a sum is finite exactly when no element is NaN or
    infinite, unless finite elements overflow, and only then do we pay for the
    exact elementwise test.
    """
    if tensor.numel() == 0:
        return True
    # Half-precision sums overflow easily; accumulate in float32.
    dtype = torch.float32 if tensor.element_size() < 4 else None
    if bool(torch.isfinite(tensor.sum(dtype=dtype))):
        return True
    return bool(torch.isfinite(tensor).all())


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor with NaN or inf."""
    for name, tensor in tensors.items():
        if not is_finite(tensor):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(
                f"{what}: tensor {name!r} (shape {tuple(tensor.shape)}) holds {n_bad} "
                "NaN or infinite value(s). Check the fine-tuned weights for a diverged "
                "run (lower the learning rate, or clip gradients) before merging."
            )


def check_same_layout(
    expected: Mapping[str, Tensor | tuple[tuple[int, ...], torch.dtype]],
    actual: Mapping[str, Tensor],
    what: str,
    *,
    check_dtype: bool = True,
) -> None:
    """Raise unless ``actual`` has exactly the names, shapes and dtypes of ``expected``.

    ``expected`` maps names to tensors or to ``(shape, dtype)`` pairs.
    """
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {preview(unexpected)}")
        raise StateDictMismatchError(
            f"{what}: tensor names do not match ({'; '.join(parts)}). Build every task "
            "vector from the same model with the same include/exclude patterns."
        )
    bad_shapes, bad_dtypes = [], []
    for name, ref in expected.items():
        shape, dtype = (tuple(ref.shape), ref.dtype) if isinstance(ref, Tensor) else ref
        tensor = actual[name]
        if tuple(tensor.shape) != tuple(shape):
            bad_shapes.append(f"{name!r}: expected {tuple(shape)}, got {tuple(tensor.shape)}")
        elif check_dtype and tensor.dtype != dtype:
            bad_dtypes.append(f"{name!r}: expected {dtype}, got {tensor.dtype}")
    if bad_shapes:
        raise StateDictMismatchError(
            f"{what}: {len(bad_shapes)} tensor(s) changed shape: "
            + "; ".join(bad_shapes[:5])
            + (f" and {len(bad_shapes) - 5} more" if len(bad_shapes) > 5 else "")
            + ". Task vectors can only be combined when they come from one architecture."
        )
    if bad_dtypes:
        raise DtypeMismatchError(
            f"{what}: {len(bad_dtypes)} tensor(s) have another dtype: "
            + "; ".join(bad_dtypes[:5])
            + (f" and {len(bad_dtypes) - 5} more" if len(bad_dtypes) > 5 else "")
            + ". Convert first, e.g. task_vector.to(dtype=torch.float32)."
        )


def check_scale(scale: object, what: str, *, low: float = 0.0, high: float = 10.0) -> float:
    """Return ``scale`` as a float, or raise unless it is a real number in (low, high]."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ConfigError(f"`scale` must be a real number in ({low:g}, {high:g}], got {scale!r} ({what}).")
    value = float(scale)
    if not math.isfinite(value) or not (low < value <= high):
        raise ConfigError(
            f"`scale` must be a real number in ({low:g}, {high:g}], got {scale!r} ({what}). "
            "Pass scale=None to use the method's default."
        )
    return value


def check_bool(value: object, name: str, owner: str) -> bool:
    """Return ``value`` unchanged, or raise unless it is exactly True or False (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"`{name}` must be True or False, got {value!r} ({owner}).")
    return value
