"""DARE: drop and rescale each incoming task vector, an option of every merger.

Yu, Yu, Yu, Huang, Li. "Language Models are Super Mario: Absorbing Abilities
from Homologous Models as a Free Lunch", ICML 2024
(https://arxiv.org/abs/2311.03099). Reference code: github.com/yule-BUAA/MergeLM,
``model_merging_methods/mask_weights_utils.py::mask_input_with_mask_rate``.
Deng, Zhao, Vakilian, Chen, Li, Thrampoulidis. "DARE the Extreme: Revisiting
Delta-Parameter Pruning for Fine-Tuned Models", ICLR 2025
(https://arxiv.org/abs/2410.09344), on how far the drop rate can go.

Rule: every entry of τ is set to 0 with probability ``p`` and otherwise
divided by 1 − p, so that E[DARE(τ)] = τ entry by entry. With
``get_merger(name, dare=p, dare_seed=s)`` the merger applies it to each task
vector it receives, before the method's own rule.

Differences from the reference:

* the draws. The reference calls ``torch.bernoulli`` on the whole tensor, so
  the mask depends on the global generator, the device and the order of the
  calls. Here the draw of an entry is a pure function of
  ``(dare_seed, task index, tensor name, index of the entry in the flattened
  tensor)``: a counter-based hash (SplitMix64's finaliser over a 64-bit key
  from BLAKE2b) computed in int64 arithmetic, which every device does bit for
  bit alike. A tensor processed whole, in chunks of any size, or split into
  shards at any offset (``offset=``), on any number of processes or threads,
  and a run resumed from a checkpoint, all draw the same mask;
* an entry is dropped when its 53-bit draw is below ⌊p·2⁵³⌋, an integer
  comparison: the drop probability is p to within 2⁻⁵³;
* the extension "DAREx" of the second paper (a rescaling factor other than
  1/(1 − p)) is not implemented.

The rescaled values are rounded to the task vector's dtype, as the
reference's ``torch.div`` does; a rescaled entry that overflows that dtype is
reported by the merger (``NonFiniteError``) before anything changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
import math
import numbers

import torch
from torch import Tensor

from cl_plugin.errors import ConfigError
from cl_plugin.merging._kernels import DRAW_BITS, splitmix_draws
from cl_plugin.task_vectors import TaskVector

__all__ = ["dare", "dare_keep_mask", "dare_task_vector", "check_dare", "stream_key", "CHUNK_NUMEL"]

#: Elements hashed per chunk (a speed setting only: the draws do not depend on it).
CHUNK_NUMEL = 1 << 16

_BITS = DRAW_BITS  # bits of each draw


def stream_key(seed: int, task: int, name: str) -> int:
    """The 64-bit key of the draws of tensor ``name`` in the ``task``-th update (0-based)."""
    text = f"{seed}\x00{task}\x00{name}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8, person=b"cl-plugin-dare").digest(), "little")


def _draws(key: int, start: int, count: int, device) -> Tensor:
    """The 53-bit draws of entries ``start .. start + count - 1`` (:func:`~cl_plugin.merging._kernels.splitmix_draws`)."""
    return splitmix_draws(key, start, count, device)


def _threshold(p: float) -> int:
    return math.floor(p * 2.0**_BITS)


def check_dare(p: object, seed: object, owner: str = "get_merger") -> tuple[float | None, int]:
    """Validate the DARE options; return ``(p, seed)`` with ``p = None`` when DARE is off (None or 0).

    Raises:
        ConfigError: ``p`` is not a real number in [0, 1), or ``seed`` is not an integer >= 0.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"`dare_seed` must be a non-negative integer, got {seed!r} ({owner}).")
    if p is None:
        return None, int(seed)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(float(p)) or not 0 <= p < 1:
        raise ConfigError(
            f"`dare` is the drop rate and must be a real number in [0, 1), got {p!r} ({owner}); "
            "pass dare=None or 0 to turn DARE off."
        )
    return (float(p) if p > 0 else None), int(seed)


def dare_keep_mask(
    numel: int, p: float, *, seed: int, task: int, name: str, offset: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Which of the entries ``offset .. offset + numel - 1`` of tensor ``name`` DARE keeps (bool, shape ``(numel,)``).

    Entries are numbered in the flattened (row-major) order of the whole tensor;
    a shard that starts at element ``offset`` of it passes that offset and gets
    the same draws as the whole tensor has there.
    """
    threshold = _threshold(p)
    key = stream_key(seed, task, name)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, CHUNK_NUMEL):
        stop = min(start + CHUNK_NUMEL, numel)
        torch.ge(_draws(key, offset + start, stop - start, out.device), threshold, out=out[start:stop])
    return out


def dare(tensor: Tensor, p: float, *, seed: int, task: int, name: str, offset: int = 0) -> Tensor:
    """A new tensor: ``tensor`` with the entries DARE drops set to 0 and the others divided by ``1 - p``.

    Args:
        tensor: a floating-point tensor (a whole tensor of the task vector, or a
            shard of it that starts at element ``offset`` of the flattened tensor).
        p: the drop rate, in (0, 1).
        seed, task, name: what the draws depend on (with the entry's index).
        offset: the index of ``tensor``'s first element in the whole tensor.
    """
    source = tensor.detach().reshape(-1)
    out = torch.empty(source.shape, dtype=tensor.dtype, device=tensor.device)
    threshold = _threshold(p)
    key = stream_key(seed, task, name)
    keep_rate = 1.0 - p
    for start in range(0, source.numel(), CHUNK_NUMEL):
        stop = min(start + CHUNK_NUMEL, source.numel())
        dropped = torch.lt(_draws(key, offset + start, stop - start, out.device), threshold)
        chunk = out[start:stop]
        torch.div(source[start:stop], keep_rate, out=chunk)
        chunk.masked_fill_(dropped, 0.0)
    return out.view(tensor.shape)


def dare_task_vector(
    tv: TaskVector, p: float, *, seed: int, task: int, offsets: Mapping[str, int] | None = None
) -> TaskVector:
    """DARE applied to every tensor of ``tv`` (a tied tensor once, under its canonical name); ``tv`` is not modified.

    ``offsets``: where each tensor of ``tv`` starts in its whole flattened
    tensor, when ``tv`` holds a rank's slices (a sharded merge); default 0.
    """
    offsets = offsets or {}
    with torch.no_grad():
        tensors = {n: dare(t, p, seed=seed, task=task, name=n, offset=offsets.get(n, 0)) for n, t in tv.items()}
    return TaskVector(tensors, aliases=tv.aliases, check_finite=False)
