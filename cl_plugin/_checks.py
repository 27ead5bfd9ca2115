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


def _dense_order(tensor: Tensor) -> Tensor:
    """``tensor`` with its dimensions permuted into memory order when that makes it contiguous.

    A full reduction does not depend on the order of the elements, and some
    (``aminmax``) run several times slower over a transposed view than over
    the same memory read in order.
    """
    if tensor.dim() < 2 or tensor.is_contiguous():
        return tensor
    order = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    permuted = tensor.permute(order)
    return permuted if permuted.is_contiguous() else tensor


def max_abs(tensor: Tensor) -> float:
    """The largest magnitude in ``tensor`` as a Python float (0.0 when it is empty).

    The result is NaN or infinite exactly when the tensor holds NaN or
    infinity, so one reduction both checks finiteness and bounds the values.
    It is one ``aminmax`` pass: as cheap as a sum for float32 and several times
    cheaper than a float32-accumulated sum of a 16-bit tensor, with no
    temporary the size of the tensor.
    """
    if tensor.numel() == 0:
        return 0.0
    tensor = tensor.detach()
    if tensor.layout != torch.strided:  # sparse: aminmax has no kernel for it
        tensor = tensor.to_dense()
    low, high = torch.aminmax(_dense_order(tensor))
    low, high = float(low), float(high)
    if math.isnan(low) or math.isnan(high):
        return math.nan
    return max(-low, high)


def is_finite(tensor: Tensor) -> bool:
    """True when no element of ``tensor`` is NaN or infinite (integer tensors always are).

    One reduction (see :func:`max_abs`), no mask the size of the tensor.
    """
    if not tensor.is_floating_point():
        return True
    return math.isfinite(max_abs(tensor))


def _non_finite_error(what: str, name: str, tensor: Tensor) -> NonFiniteError:
    n_bad = int((~torch.isfinite(tensor)).sum())
    return NonFiniteError(
        f"{what}: tensor {name!r} (shape {tuple(tensor.shape)}) holds {n_bad} "
        "NaN or infinite value(s). Check the fine-tuned weights for a diverged "
        "run (lower the learning rate, or clip gradients) before merging."
    )


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor with NaN or inf."""
    for name, tensor in tensors.items():
        if not is_finite(tensor):
            raise _non_finite_error(what, name, tensor)


def finite_max_abs(tensors: Mapping[str, Tensor], what: str) -> dict[str, float]:
    """The largest magnitude of each tensor; raise :class:`NonFiniteError` naming the first with NaN or inf.

    The same single reduction per tensor as :func:`check_finite`, returning
    what it computed.
    """
    out = {}
    for name, tensor in tensors.items():
        value = max_abs(tensor)
        if not math.isfinite(value):
            raise _non_finite_error(what, name, tensor)
        out[name] = value
    return out


def tensor_norm(tensor: Tensor) -> float:
    """The Euclidean norm of ``tensor`` as a Python float, finite whenever the entries are.

    16-bit tensors are reduced in float32 (their squares overflow float16).
    A norm that overflows the tensor's dtype although every entry is finite
    (float32 entries near 1e38, or squares summed in float32 on a GPU) is
    computed again on the tensor divided by its largest magnitude; only then
    is a temporary of its size allocated.
    """
    value = float(torch.linalg.vector_norm(tensor, dtype=torch.float32 if tensor.element_size() < 4 else None))
    if math.isfinite(value):
        return value
    largest = max_abs(tensor)
    if not math.isfinite(largest):
        return largest
    scaled = torch.linalg.vector_norm(tensor / largest, dtype=torch.float32 if tensor.element_size() < 4 else None)
    return largest * float(scaled)


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


def check_same_aliases(expected: Mapping[str, str], actual: Mapping[str, str], what: str) -> None:
    """Raise :class:`StateDictMismatchError` unless two task vectors tie the same names (alias -> canonical)."""
    if dict(expected) == dict(actual):
        return

    def tie(aliases: Mapping[str, str], name: str) -> str:
        return f"tied to {aliases[name]!r}" if name in aliases else "not tied"

    differ = sorted(n for n in {*expected, *actual} if expected.get(n) != actual.get(n))
    detail = "; ".join(f"{n!r}: {tie(expected, n)} vs {tie(actual, n)}" for n in differ[:5])
    more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
    raise StateDictMismatchError(
        f"{what}: the task vectors tie different names ({detail}{more}). Build every task vector from the same "
        "model the same way: TaskVector.between(finetuned, base) records the tied weights of `finetuned`."
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
