"""Task-aware evaluation: restrict a model's prediction to the classes of one experience.

Class-incremental accuracy takes the argmax over every class the head has;
task-aware (task-incremental) accuracy knows which experience a test sample
comes from and takes the argmax over that experience's classes only, as a
multi-head model with one head per task would. :func:`mask_to_classes` turns
the first into the second on the logits of a single shared head, so the same
model can be scored both ways (``docs/metrics.md`` compares the two).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from cl_plugin.errors import ConfigError

__all__ = ["mask_to_classes"]


def mask_to_classes(logits: Tensor, classes: Union[Sequence[int], Tensor]) -> Tensor:
    """``logits`` with every class outside ``classes`` set to ``-inf``.

    The argmax of the result is the best class among ``classes``; a softmax
    gives the others probability 0. The input is not changed, and gradients
    flow to the kept logits.

    Args:
        logits: ``(N, C)`` floating-point scores of a head over ``C`` classes.
        classes: the class indices to keep (the experience's classes), each an
            int in ``[0, C)``, at least one; a sequence of ints or a 1-D integer
            tensor. Repeats are allowed and change nothing.

    Returns:
        A new ``(N, C)`` tensor with the dtype and device of ``logits``.

    Raises:
        ConfigError: if ``logits`` is not a 2-D floating-point tensor, or
            ``classes`` is empty or holds something other than ints in
            ``[0, C)``.

    Example:
        >>> logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 0.0, 2.0]])
        >>> mask_to_classes(logits, [2, 3])
        tensor([[-inf, -inf, 2., 0.],
                [-inf, -inf, 0., 2.]])
        >>> mask_to_classes(logits, [2, 3]).argmax(dim=1)  # class-incremental argmax: [0, 3]
        tensor([2, 3])
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        dtype = f" and dtype {logits.dtype}" if isinstance(logits, Tensor) else ""
        raise ConfigError(
            f"`logits` must be a floating-point tensor of shape (N, C), got {shape}{dtype}."
        )
    n_classes = logits.shape[1]
    indices = _class_indices(classes, n_classes)
    keep = torch.zeros(n_classes, dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(indices, dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def _class_indices(classes: object, n_classes: int) -> list[int]:
    """``classes`` as a non-empty list of ints in ``[0, n_classes)``, or a :class:`ConfigError`."""
    if isinstance(classes, Tensor):
        if classes.ndim != 1 or classes.dtype == torch.bool or classes.is_floating_point():
            raise ConfigError(
                f"`classes` must be a 1-D integer tensor or a sequence of ints, got a tensor of "
                f"shape {tuple(classes.shape)} and dtype {classes.dtype}."
            )
        values: list[object] = classes.tolist()
    elif isinstance(classes, Sequence) and not isinstance(classes, (str, bytes)):
        values = list(classes)
    else:
        raise ConfigError(
            f"`classes` must be a sequence of ints (the experience's classes), got "
            f"{type(classes).__name__}: {classes!r}."
        )
    if not values:
        raise ConfigError("`classes` is empty: name at least one class to keep.")
    indices = []
    for value in values:
        index = None
        if not isinstance(value, bool):
            try:
                index = operator.index(value)
            except TypeError:
                index = None
        if index is None or not 0 <= index < n_classes:
            raise ConfigError(
                f"`classes` must hold ints in [0, {n_classes}) for logits over {n_classes} "
                f"classes, got {value!r} in {values!r}."
            )
        indices.append(index)
    return indices
