"""Packed tensors: many named tensors as views of one flat buffer, so an elementwise pass is one call.

A model has hundreds of tensors (ViT-S: 152, a third of them biases and norm
weights of a few hundred elements). An update rule called once per tensor
pays its dispatch (and, for a compiled kernel, its guards) per tensor; on
ViT-S that overhead alone made the MagMax update 2 to 3 times its one-pass
cost. The merger state, θ₀ and the task vectors the boundary core forms are
therefore allocated as *packed* dicts: one contiguous buffer per dtype and
device, each name a view of its range, in name order. :func:`aligned_runs`
finds, for several such dicts, the longest stretches of names that are
consecutive in every one of them, and returns each stretch as one flat view:
a whole dict in one call when every input is packed, one tensor per call when
none is (a user's own task vector). The results are the same either way (the
rules are elementwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["STREAM_CHUNK_NUMEL", "aligned_runs", "difference_chunks", "packed_like", "run_spans"]


def packed_like(
    tensors: Mapping[str, Tensor],
    *,
    dtype: Callable[[Tensor], torch.dtype] | None = None,
    device: torch.device | None = None,
    fill: float | None = 0.0,
) -> dict[str, Tensor]:
    """New tensors shaped as ``tensors``, as views of one flat buffer per (dtype, device), in the same order.

    Args:
        tensors: name -> tensor; only shapes, dtypes and devices are read.
        dtype: the dtype of each new tensor, from the old one (default: the same).
        device: where to allocate (default: each tensor's device).
        fill: the initial value, or None for uninitialised memory (the caller
            overwrites every element).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[str, Tensor]]] = {}
    for name, t in tensors.items():
        key = (dtype(t) if dtype is not None else t.dtype, device if device is not None else t.device)
        groups.setdefault(key, []).append((name, t))
    out: dict[str, Tensor] = {}
    for (group_dtype, group_device), members in groups.items():
        total = sum(t.numel() for _, t in members)
        if fill is None:
            buffer = torch.empty(total, dtype=group_dtype, device=group_device)
        else:
            buffer = torch.full((total,), fill, dtype=group_dtype, device=group_device)
        start = 0
        for name, t in members:
            out[name] = buffer[start : start + t.numel()].view(t.shape)
            start += t.numel()
    return {name: out[name] for name in tensors}


def _follows(previous: Tensor, current: Tensor) -> bool:
    """True when ``current`` starts in the same storage right where the contiguous ``previous`` ends."""
    return (
        current.is_contiguous()
        and current.dtype == previous.dtype
        and current.device == previous.device
        and current.untyped_storage().data_ptr() == previous.untyped_storage().data_ptr()
        and current.storage_offset() == previous.storage_offset() + previous.numel()
    )


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    """One 1-D view over tensors that follow each other in one storage (a single tensor: its flat view)."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.reshape(-1)
    total = sum(t.numel() for t in tensors)
    return first.as_strided((total,), (1,), first.storage_offset())


def run_spans(*lists: Sequence[Tensor]) -> list[tuple[int, int]]:
    """The ``[i, j)`` position spans :func:`aligned_runs` joins (each a run of its own when it cannot join)."""
    count = len(lists[0])
    if any(len(tensors) != count for tensors in lists):
        raise ValueError("aligned_runs needs lists of equal length.")
    spans: list[tuple[int, int]] = []
    start = 0
    while start < count:
        stop = start + 1
        if all(tensors[start].is_contiguous() for tensors in lists):
            while stop < count and all(_follows(tensors[stop - 1], tensors[stop]) for tensors in lists):
                stop += 1
        spans.append((start, stop))
        start = stop
    return spans


def aligned_runs(*lists: Sequence[Tensor]) -> list[tuple[Tensor, ...]]:
    """Equal-length lists of equally sized tensors as few matching flat views as possible.

    Consecutive positions i..j form one run when, in every list, tensor i is
    contiguous and each next one starts where the previous ends in the same
    storage. Each run is returned as one tuple of 1-D views (one per list),
    covering the runs in order; a position that cannot join its neighbour is
    a run of its own (``reshape(-1)``: a copy only if that tensor is not
    contiguous, as an elementwise rule on it would need anyway).

    Writing into a returned view writes into the tensors when they were
    contiguous; callers that write check that (the merger state always is).
    """
    return [tuple(_flat(tensors[i:j]) for tensors in lists) for i, j in run_spans(*lists)]


#: Elements of τ formed at a time by :func:`difference_chunks` (1 MiB of float32): at least
#: the size from which the fused kernels compile (``_kernels.COMPILE_MIN_NUMEL``).
STREAM_CHUNK_NUMEL = 1 << 18


def difference_chunks(
    targets: Sequence[Sequence[Tensor]],
    base: Sequence[Tensor],
    live: Sequence[Tensor],
    chunk_numel: int | None = None,
    pieces: bool = False,
) -> Iterator[tuple[Any, ...]]:
    """Yield ``(target views ..., live − base)`` chunk by chunk, without forming ``live − base`` whole.

    Args:
        targets: lists of tensors to update (e.g. a merger's state roles), each
            the shapes of ``base``; written through the yielded views.
        base: the tensors subtracted (θ₀), packed or not.
        live: the tensors subtracted from (the model's weights, any layout,
            any device: each piece is moved to ``base``'s device).
        chunk_numel: elements per chunk (default :data:`STREAM_CHUNK_NUMEL`).
        pieces: also yield, last, what the chunk is made of: a list of
            ``(index into base, offset in that tensor's flattened elements, length)``
            in chunk order (for a rule that depends on an element's position).

    The positions are walked in :func:`aligned_runs`'s runs of ``targets`` and
    ``base``; each chunk of a run is one flat view of each target and one
    scratch buffer holding ``live − base`` over the same elements, computed
    with one subtraction per tensor piece, rounded as ``torch.sub`` rounds
    it. A chunk spans tensor boundaries inside a run. The scratch buffer is
    reused: consume each tuple before asking for the next.
    """
    size = chunk_numel or STREAM_CHUNK_NUMEL
    scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    for i, j in run_spans(*targets, base):
        flats = [_flat(tensors[i:j]) for tensors in targets]
        base_flat = _flat(base[i:j])
        key = (base_flat.dtype, base_flat.device)
        if key not in scratch:
            scratch[key] = torch.empty(size, dtype=base_flat.dtype, device=base_flat.device)
        buffer = scratch[key]
        chunk_start, fill, position = 0, 0, 0
        made_of: list[tuple[int, int, int]] = []
        for k in range(i, j):
            source = live[k].reshape(-1)
            numel, offset = source.numel(), 0
            while offset < numel:
                take = min(numel - offset, size - fill)
                piece = source[offset : offset + take]
                if piece.device != base_flat.device:
                    piece = piece.to(base_flat.device)
                at = position + offset
                torch.sub(piece, base_flat[at : at + take], out=buffer[fill : fill + take])
                if pieces:
                    made_of.append((k, offset, take))
                fill += take
                offset += take
                if fill == size:
                    yield (*(f[chunk_start : chunk_start + size] for f in flats), buffer, *([made_of] if pieces else []))
                    chunk_start += size
                    fill, made_of = 0, []
            position += numel
        if fill:
            yield (*(f[chunk_start : chunk_start + fill] for f in flats), buffer[:fill], *([made_of] if pieces else []))
