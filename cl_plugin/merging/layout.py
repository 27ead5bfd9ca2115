"""Which part of every merged tensor this process holds: the sharded layout of the boundary core.

A merge over W processes works on *local slices with global offsets*: for each
tensor, the rank holds one contiguous range ``[start, stop)`` of the tensor
flattened in row-major order.

* Under FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard``) a
  parameter is a ``DTensor`` sharded on dim 0: the rank's local shard is a
  block of whole rows, which is a contiguous range of the flattened tensor.
* Under DDP (replicated weights) and for tensors FSDP2 does not shard
  (buffers), the merger splits each flattened tensor into W ranges itself,
  as ``torch.chunk`` splits a dimension: ``ceil(N / W)`` elements per rank,
  the last ranks shorter or empty.

θ₀ and the merger's state are held per rank as these slices, so each rank
keeps P/W of every model copy. Elementwise rules (MagMax, averages, sums,
random selection, DARE) fold their slice with no communication; rules that
need a global statistic or a whole tensor use the collectives below, and give
the same bits as the unsharded merge.

No Lightning import.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cl_plugin.merging._kernels import HIGH_BINS, LOW_BINS, MagnitudeHistogram
from cl_plugin._packed import aligned_runs

__all__ = [
    "Shard",
    "ShardLayout",
    "kth_smallest_magnitude",
    "kth_smallest_magnitude_of",
    "split_range",
]


def takes_cpu_tensors(group=None) -> bool:
    """Whether the process group's backend runs collectives on CPU tensors (gloo, or e.g. ``"cpu:gloo,cuda:nccl"``).

    A group started with ``"nccl"`` alone (Lightning's default on GPUs) does not.
    """
    name = str(torch.distributed.get_backend(group)).lower()
    if ":" in name:
        return any(part.split(":", 1)[0].strip() == "cpu" for part in name.split(","))
    return name in ("gloo", "mpi", "undefined", "fake")


_CPU_GROUPS: dict[tuple, Any] = {}


def cpu_group(group=None):
    """``group`` (None: the default group) if it takes CPU tensors, else a gloo group over the same ranks.

    The core's collectives exchange CPU tensors (θ₀ and the merger's state
    live on the CPU by default, and its flags and counts always do), which a
    group started with NCCL alone refuses. The gloo group is created once;
    the first call is collective: every rank must make it, in the same order.
    Only the default group is supported here (:func:`cpu_mesh_group` for a
    device mesh's groups).
    """
    if takes_cpu_tensors(group):
        return group
    if group is not None and group is not torch.distributed.group.WORLD:
        raise ValueError("cpu_group supports the default group; use cpu_mesh_group for a device mesh's groups.")
    key = ("world",)
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def cpu_mesh_group(mesh, dim: int):
    """The group of mesh dimension ``dim``, or the same group of a CPU (gloo) copy of ``mesh`` when the
    mesh's group does not take CPU tensors (:func:`cpu_group`). The first call is collective over every rank."""
    group = mesh.get_group(dim)
    if takes_cpu_tensors(group):
        return group
    key = ("mesh", tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()), dim)
    if key not in _CPU_GROUPS:
        from torch.distributed.device_mesh import DeviceMesh

        _CPU_GROUPS[key] = DeviceMesh("cpu", mesh.mesh.clone(), mesh_dim_names=mesh.mesh_dim_names).get_group(dim)
    return _CPU_GROUPS[key]


def split_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s part of ``numel`` elements split as ``torch.chunk`` splits."""
    if world <= 1:
        return 0, numel
    size = math.ceil(numel / world) if numel else 0
    start = min(rank * size, numel)
    return start, min(start + size, numel)


@dataclass(frozen=True)
class Shard:
    """One tensor's place in the layout: its global shape and this rank's flat range."""

    shape: tuple[int, ...]
    start: int
    stop: int
    #: True when the range is the local shard of a DTensor (it lives in that rank only).
    sharded: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local_numel(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.numel


#: The largest bucket (elements) that :meth:`ShardLayout.complete_in_place` packs small slices into.
#: 1M elements (4 MiB of float32): on ViT-S under DDP (gloo, 2 processes) a boundary took the
#: same time as with 4M-element buckets, and its resident peak fell from about 1 P/W to near 0
#: (benchmarks/scale.py).
BROADCAST_BUCKET_NUMEL = 1 << 20


class ShardLayout:
    """Each merged tensor's :class:`Shard` on this rank, with the process group the rank merges in.

    Args:
        shards: name -> :class:`Shard`, in the merge order.
        rank: this process's index in ``group`` (0 without one).
        world: the number of processes that share the merge (1: unsharded).
        group: the ``torch.distributed`` process group of those processes
            (None: the default group, or no communication when ``world == 1``).
    """

    def __init__(self, shards: Mapping[str, Shard], rank: int = 0, world: int = 1, group=None) -> None:
        self.shards = dict(shards)
        self.rank = int(rank)
        self.world = int(world)
        self.group = group
        self._sizes: dict[str, list[int]] = {}  # per rank, for tensors not split as split_range splits them
        #: FSDP2: the device mesh and mesh dimension of the DTensor shards (None: no DTensors).
        self.mesh = None
        self.mesh_dim: int | None = None

    @classmethod
    def unsharded(cls, shapes: Mapping[str, Sequence[int]]) -> ShardLayout:
        """Every tensor whole, on one process."""
        return cls({n: Shard(tuple(s), 0, math.prod(s)) for n, s in shapes.items()})

    @classmethod
    def split(
        cls,
        shapes: Mapping[str, Sequence[int]],
        rank: int,
        world: int,
        group=None,
        *,
        whole_on: Mapping[str, int] | None = None,
    ) -> ShardLayout:
        """Every tensor split into ``world`` contiguous ranges (replicated weights, e.g. under DDP).

        ``whole_on`` (name -> rank) places those tensors whole on one rank
        instead (empty elsewhere): for a rule that works on whole matrices
        (OPCM), whose owner then needs no gather and no scatter.
        """
        whole_on = dict(whole_on or {})
        shards, sizes = {}, {}
        for n, s in shapes.items():
            numel = math.prod(s)
            if n in whole_on:
                owner = whole_on[n]
                column = [numel if r == owner else 0 for r in range(world)]
                start = sum(column[:rank])
                shards[n] = Shard(tuple(s), start, start + column[rank])
                sizes[n] = column
            else:
                shards[n] = Shard(tuple(s), *split_range(numel, rank, world))
        layout = cls(shards, rank, world, group)
        layout._sizes = sizes
        return layout

    @classmethod
    def from_local_sizes(
        cls, shapes: Mapping[str, Sequence[int]], local_numel: Mapping[str, int | None], rank: int, world: int, group
    ) -> ShardLayout:
        """A layout where some tensors are already sharded (FSDP2's dim-0 shards, ``local_numel`` given) and the
        others (``None``) are split as :meth:`split` splits them.

        One ``all_gather`` of the local sizes gives every shard's offset: shard
        ``r`` follows the shards of ranks ``0 .. r-1``, as ``torch.chunk`` orders them.
        """
        names = [n for n, size in local_numel.items() if size is not None]
        mine = torch.tensor([local_numel[n] for n in names], dtype=torch.int64)
        parts = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(parts, mine, group=group)
        sizes = torch.stack(parts)  # (world, tensors)
        shards, all_sizes = {}, {}
        for n, shape in shapes.items():
            numel = math.prod(shape)
            if local_numel[n] is None:
                shards[n] = Shard(tuple(shape), *split_range(numel, rank, world))
                continue
            column = sizes[:, names.index(n)].tolist()
            if sum(column) != numel:
                raise ValueError(f"The shards of {n!r} hold {sum(column)} elements, the tensor {numel}.")
            start = sum(column[:rank])
            shards[n] = Shard(tuple(shape), start, start + column[rank], sharded=True)
            all_sizes[n] = column
        layout = cls(shards, rank, world, group)
        layout._sizes = all_sizes
        return layout

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shards)

    def __getitem__(self, name: str) -> Shard:
        return self.shards[name]

    def __repr__(self) -> str:
        local = sum(s.local_numel for s in self.shards.values())
        total = sum(s.numel for s in self.shards.values())
        return f"ShardLayout({len(self)} tensors, rank {self.rank} of {self.world}, {local:,} of {total:,} elements)"

    # -- collectives (no-ops on one process) ------------------------------------------------------------
    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any (one ``all_reduce`` of one integer; ``flag`` on one process)."""
        if not self.distributed:
            return flag
        return bool(self.all_reduce_(torch.tensor([int(flag)])))

    def holds_whole(self, name: str, rank: int) -> bool:
        """Whether rank ``rank`` holds all of tensor ``name`` (the same answer on every rank)."""
        return self._slice_sizes(name)[rank] == self.shards[name].numel

    def gather_whole(self, name: str, local: Tensor, owner: int) -> Tensor | None:
        """The whole tensor ``name`` (global shape) on rank ``owner`` from every rank's slice; None elsewhere.

        ``local`` is this rank's flat slice. Slices are padded to one size for
        the collective and the padding is dropped, so the result is exact.
        """
        shard = self.shards[name]
        if not self.distributed:
            return local.reshape(shard.shape)
        if self.holds_whole(name, owner):  # nothing to send (every rank knows the sizes)
            return local.reshape(shard.shape) if self.rank == owner else None
        sizes = self._slice_sizes(name)
        width = max(sizes) or 1
        padded = local.new_zeros(width)
        padded[: local.numel()] = local.reshape(-1)
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == owner else None
        torch.distributed.gather(padded, parts, dst=self._global_rank(owner), group=self.group)
        if self.rank != owner:
            return None
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).reshape(shard.shape)

    def scatter_slices(self, name: str, whole: Tensor | None, owner: int, out: Tensor) -> None:
        """Copy each rank's slice of ``whole`` (given on ``owner``) into that rank's flat ``out``."""
        shard = self.shards[name]
        if not self.distributed:
            out.copy_(whole.reshape(-1))
            return
        if self.holds_whole(name, owner):  # the owner's own slice is everything
            if self.rank == owner:
                out.copy_(whole.reshape(-1))
            return
        sizes = self._slice_sizes(name)
        width = max(sizes) or 1
        received = out.new_zeros(width)
        parts = None
        if self.rank == owner:
            flat = whole.reshape(-1)
            parts, offset = [], 0
            for n in sizes:
                part = flat.new_zeros(width)
                part[:n] = flat[offset : offset + n]
                parts.append(part)
                offset += n
        torch.distributed.scatter(received, parts, src=self._global_rank(owner), group=self.group)
        out.copy_(received[: shard.local_numel])

    def complete_in_place(self, wholes: Mapping[str, Tensor]) -> None:
        """Fill every rank's range of each flat whole tensor in ``wholes`` (name -> tensor of the global numel,
        on every rank) from the rank that holds it; each rank has written its own range already.

        Each rank in turn broadcasts its ranges, several small ones packed into
        one bucket of at most :data:`BROADCAST_BUCKET_NUMEL` elements: a few
        large broadcasts instead of one ``all_gather`` per tensor (measured on
        gloo: an ``all_gather`` moves data several times slower than a
        broadcast, and each call has a fixed cost). Extra memory: one bucket.
        All ranks must call it with the same names.
        """
        sizes = {n: self._slice_sizes(n) for n in wholes}
        self._broadcast_ranges(wholes, lambda n, r: (sum(sizes[n][:r]), sum(sizes[n][: r + 1])))

    def made_whole(self, slices: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Flat whole tensors (global numel) on every rank from every rank's ``slices`` (bucketed broadcasts)."""
        wholes = {}
        for n, t in slices.items():
            wholes[n] = t.new_empty(self.shards[n].numel)
            wholes[n][self.shards[n].start : self.shards[n].stop].copy_(t.reshape(-1))
        self.complete_in_place(wholes)
        return wholes

    def share_from_owners(self, wholes: Mapping[str, Tensor], owners: Mapping[str, int]) -> None:
        """Copy each flat tensor ``wholes[n]`` from rank ``owners[n]`` (which holds it whole) to every rank,
        in buckets as :meth:`complete_in_place` does. All ranks must call it with the same names and owners."""
        self._broadcast_ranges(wholes, lambda n, r: (0, wholes[n].numel()) if r == owners[n] else (0, 0))

    def _broadcast_ranges(self, wholes: Mapping[str, Tensor], range_of: Callable[[str, int], tuple[int, int]]) -> None:
        """For each rank in turn, broadcast the range ``range_of(name, rank)`` of every flat tensor in ``wholes``."""
        if not self.distributed:
            return
        for source in range(self.world):
            pending: list[tuple[Tensor, int, int]] = []  # (whole, start, stop) packed into the next bucket
            pending_numel = 0

            def flush() -> None:
                nonlocal pending, pending_numel
                if not pending:
                    return
                bucket = pending[0][0].new_empty(pending_numel)
                if self.rank == source:
                    torch.cat([w[a:b] for w, a, b in pending], out=bucket)
                torch.distributed.broadcast(bucket, src=self._global_rank(source), group=self.group)
                if self.rank != source:
                    offset = 0
                    for w, a, b in pending:
                        w[a:b].copy_(bucket[offset : offset + b - a])
                        offset += b - a
                pending, pending_numel = [], 0

            for name, whole in wholes.items():
                start, stop = range_of(name, source)
                if stop == start:
                    continue
                if stop - start >= BROADCAST_BUCKET_NUMEL:  # large enough alone: broadcast in place, no packing
                    torch.distributed.broadcast(whole[start:stop], src=self._global_rank(source), group=self.group)
                    continue
                if pending and (
                    pending[0][0].dtype != whole.dtype
                    or pending[0][0].device != whole.device
                    or pending_numel + stop - start > BROADCAST_BUCKET_NUMEL
                ):
                    flush()
                pending.append((whole, start, stop))
                pending_numel += stop - start
            flush()

    def _slice_sizes(self, name: str) -> list[int]:
        """The number of elements of ``name`` on each rank, in rank order."""
        shard = self.shards[name]
        if name in self._sizes:
            return self._sizes[name]
        ranges = [split_range(shard.numel, r, self.world) for r in range(self.world)]
        return [stop - start for start, stop in ranges]

    def _global_rank(self, rank: int) -> int:
        if self.group is None:
            return rank
        return torch.distributed.get_global_rank(self.group, rank)

    def owners(self, cost: Mapping[str, float]) -> dict[str, int]:
        """A rank per item, balancing ``cost`` (largest first, to the least-loaded rank; ties to the lower rank).

        A pure function of the items (in ``cost``'s order) and their costs, so every rank computes the same owners.
        """
        load = [0.0] * self.world
        owner = {}
        order = {n: i for i, n in enumerate(cost)}
        for name in sorted(cost, key=lambda n: (-cost[n], order[n])):
            r = min(range(self.world), key=lambda i: (load[i], i))
            owner[name] = r
            load[r] += cost[name]
        return owner

    def rounds(self, owners: Mapping[str, int], cost: Mapping[str, float]) -> list[list[str]]:
        """The items in rounds of at most one per owner rank, for work the owners do at the same time.

        A loop that gathers an item to its owner, lets the owner compute and
        scatters the result before the next item keeps every other rank
        waiting: the work runs one rank at a time. In round k each rank works
        on its k-th item (its items largest ``cost`` first, so a round holds
        items of similar cost), and each rank holds one item whole at a time.
        Items within a round keep ``owners``' order; a pure function of
        ``owners`` and ``cost``, so every rank issues the same collectives.
        """
        order = {n: i for i, n in enumerate(owners)}
        per_rank: dict[int, list[str]] = {}
        for name in sorted(owners, key=lambda n: (-cost[n], order[n])):
            per_rank.setdefault(owners[name], []).append(name)
        depth = max((len(v) for v in per_rank.values()), default=0)
        return [
            sorted((items[k] for items in per_rank.values() if k < len(items)), key=order.__getitem__)
            for k in range(depth)
        ]


# -- exact distributed order statistics ---------------------------------------------------------------------
def _float_of(bits: int) -> float:
    """The float32 whose bit pattern is the non-negative int32 ``bits``."""
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def kth_smallest_magnitude(tensors: Iterable[Tensor], k: int, layout: ShardLayout | None = None) -> float:
    """The ``k``-th smallest ``|x|`` (1-based, as ``torch.kthvalue``) over every element of ``tensors`` on every rank.

    :func:`kth_smallest_magnitude_of` with one pass = the tensors themselves
    (tensors packed in one buffer, :mod:`cl_plugin._packed`, are read in one call).
    """
    tensors = [t.detach() for t in tensors if t.numel()]
    flats = [run for (run,) in aligned_runs(tensors)] if tensors else []
    return kth_smallest_magnitude_of(lambda: flats, k, layout)


def kth_smallest_magnitude_of(
    passes: Callable[[], Iterable[Tensor]], k: int, layout: ShardLayout | None = None
) -> float:
    """The ``k``-th smallest ``|x|`` over the values that each call of ``passes()`` yields, on every rank.

    An exact radix selection on the float32 bit patterns of the magnitudes
    (a non-negative float32 orders as its pattern does), in two reads of the
    data and no temporary the size of it (:class:`~cl_plugin.merging._kernels.MagnitudeHistogram`):

    1. a histogram of bits 16-30 of every pattern, summed over the ranks (one
       ``all_reduce`` of 32,768 counts), gives the bin that holds the answer
       and how many magnitudes lie below it;
    2. a histogram of bits 0-15 of the patterns in that bin (one ``all_reduce``
       of 65,536 counts) gives the rest of the answer's pattern.

    Every rank computes the same value, equal to
    ``torch.kthvalue(torch.cat([t.abs().float().flatten() ...]), k)`` over
    every rank's values, whatever their split into chunks and ranks.

    Args:
        passes: returns a fresh iterable over this rank's values (tensors of
            any shape, floating point, no NaN) each time it is called; it is
            called twice. E.g. the chunks of a task vector formed on the fly.
        k: 1 <= k <= the number of values over all ranks.
        layout: the ranks to count over (None: this process only).
    """
    high_counts = _histogram(passes(), None, layout)
    total = int(high_counts.sum())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is outside [1, {total}].")
    cumulative = high_counts.cumsum(0)
    high = int(torch.searchsorted(cumulative, k))  # the first bin whose cumulative count reaches k
    below = int(cumulative[high - 1]) if high else 0
    low_counts = _histogram(passes(), high, layout)
    low = int(torch.searchsorted(low_counts.cumsum(0), k - below))
    return _float_of((high << 16) | low)


def _histogram(values: Iterable[Tensor], high: int | None, layout: ShardLayout | None) -> Tensor:
    """One radix pass's counts over every rank; every rank reaches the collective even when its own count fails."""
    histogram = MagnitudeHistogram(high)
    failure: BaseException | None = None
    try:
        for t in values:
            histogram.add(t)
        counts = histogram.counts()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
        if layout is None:
            raise
        failure, counts = exc, torch.zeros(HIGH_BINS if high is None else LOW_BINS, dtype=torch.int64)
    if layout is None:
        return counts
    # The failure flag travels with the counts: one collective, in step on every rank.
    flagged = torch.cat([counts, torch.tensor([int(failure is not None)], dtype=counts.dtype)])
    layout.all_reduce_(flagged)
    if failure is not None:
        raise failure
    if int(flagged[-1]):
        raise RuntimeError("The selection of the trim threshold failed on another rank (see its error).")
    return flagged[:-1]


