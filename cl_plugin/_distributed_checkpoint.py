"""Sharded state through ``torch.distributed.checkpoint`` (DCP): each rank writes and reads only its own shards.

A model sharded with FSDP2 is checkpointed by Lightning's ``ModelParallelStrategy``
as a directory: the model and optimizer go through DCP (every rank writes its
shards), everything else (the callbacks' states among it) into one
``meta.pt`` that rank 0 writes and every rank reads. θ₀ and a merger's state
are as large as the model (or several times it), so they must not go through
``meta.pt``: rank 0 would hold all of them whole, and every rank would read
all of them back.

The boundary core therefore hands out such state as ``DTensor``\\ s, sharded as
the model's parameters are (:func:`sharded_view`); the callback moves them into
the part of the checkpoint DCP writes and leaves in its own state a small
placeholder per tensor (:func:`extract_dtensors`). On load, the placeholders
are replaced by tensors read back with DCP, each rank reading only the shards
the current mesh gives it (:func:`restore_placeholders`); DCP reshards, so a
checkpoint written on W ranks resumes on another W too.

A placeholder is a plain dict of strings and integers (it survives
``torch.load(weights_only=True)``): ``{PLACEHOLDER: key, "shape": [...],
"dtype": "float32"}``. Tensors FSDP2 does not shard (buffers) are small and
stay in ``meta.pt``, whole, as before.

No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from cl_plugin.errors import CheckpointError, ConfigError

__all__ = [
    "PLACEHOLDER",
    "extract_dtensors",
    "has_placeholders",
    "is_dtensor",
    "mesh_of",
    "restore_placeholders",
    "shard_mesh_dim",
    "shard_placements",
    "sharded_view",
]

#: The key that marks a placeholder dict in a callback's state.
PLACEHOLDER = "cl_plugin_distributed_checkpoint"


def shard_placements(mesh, dim: int) -> list:
    """``Shard(0)`` over mesh dimension ``dim`` and ``Replicate()`` over the others (FSDP2; HSDP's replicas)."""
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(0) if i == dim else Replicate() for i in range(mesh.ndim)]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def sharded_view(local: Tensor, shape: tuple[int, ...], mesh, dim: int):
    """A ``DTensor`` of global ``shape`` whose local tensor is ``local`` (no copy, no move).

    Args:
        local: this rank's shard, a block of whole rows of the tensor in
            ``torch.chunk`` order along dim 0 (FSDP2's sharding), flat or
            shaped; any device (a CPU θ₀ of a GPU model stays on the CPU).
        shape: the tensor's global shape (at least one dimension).
        mesh, dim: the device mesh and the mesh dimension the rows are split over.

    ``DTensor.from_local`` would move ``local`` to the mesh's device; the
    state kept on the CPU must not be copied to the GPU to be saved, so the
    DTensor is built from its spec directly.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    shape = tuple(int(s) for s in shape)
    start, stop = _chunk_rows(shape[0], mesh, dim)
    rows = stop - start
    if local.numel() != rows * math.prod(shape[1:]):
        raise ValueError(
            f"A shard of {local.numel()} elements is not this rank's rows {start}:{stop} of a {shape} tensor split "
            "as torch.chunk splits dim 0 (FSDP2's sharding)."
        )
    local = local.reshape(rows, *shape[1:])
    spec = DTensorSpec(
        mesh, tuple(shard_placements(mesh, dim)), tensor_meta=TensorMeta(torch.Size(shape), _contiguous_stride(shape), local.dtype)
    )
    return DTensor(local, spec, requires_grad=False)


def _chunk_rows(rows: int, mesh, dim: int) -> tuple[int, int]:
    """``[start, stop)`` of this rank's rows when ``rows`` are split as ``torch.chunk`` splits them."""
    rank, world = mesh.get_local_rank(dim), mesh.size(dim)
    size = math.ceil(rows / world) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def _empty_sharded(shape: tuple[int, ...], dtype: torch.dtype, mesh, dim: int):
    """An uninitialised DTensor of global ``shape``, this rank's rows (``torch.chunk`` order) on the CPU."""
    start, stop = _chunk_rows(shape[0], mesh, dim)
    return sharded_view(torch.empty((stop - start, *shape[1:]), dtype=dtype), shape, mesh, dim)


def is_dtensor(value: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a parameter sharded by FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(value, DTensor)


def _walk(value: Any, path: str):
    """(container, key, path) of every leaf in nested dicts and lists."""
    items = value.items() if isinstance(value, MutableMapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(item, (MutableMapping, list)) and not is_placeholder(item):
            yield from _walk(item, where)
        else:
            yield value, key, where


def is_placeholder(value: object) -> bool:
    return isinstance(value, Mapping) and PLACEHOLDER in value


def extract_dtensors(state: MutableMapping[str, Any], store: MutableMapping[str, Any], prefix: str) -> int:
    """Move every ``DTensor`` in the nested ``state`` (dicts and lists) into ``store``; leave placeholders.

    Each goes under the key ``prefix + path`` (its path in ``state``, dotted).
    Plain tensors stay where they are. Returns how many were moved.
    """
    moved = 0
    for container, key, path in list(_walk(state, "")):
        item = container[key]
        if not is_dtensor(item):
            continue
        store_key = prefix + path
        store[store_key] = item
        container[key] = {PLACEHOLDER: store_key, "shape": list(item.shape), "dtype": str(item.dtype).removeprefix("torch.")}
        moved += 1
    return moved


def has_placeholders(state: object) -> bool:
    """True when the nested ``state`` holds a placeholder of :func:`extract_dtensors`."""
    return isinstance(state, (MutableMapping, list)) and any(
        is_placeholder(container[key]) for container, key, _ in _walk(state, "")
    )


def restore_placeholders(state: MutableMapping[str, Any], checkpoint_dir, mesh, dim: int, owner: str) -> int:
    """Replace every placeholder in the nested ``state`` by its tensor, read from the DCP checkpoint ``checkpoint_dir``.

    Each comes back as a ``DTensor`` holding this rank's rows under ``mesh``
    (mesh dimension ``dim``), as FSDP2 shards the model now. Every rank of the mesh must call it with the same placeholders (it is one
    collective read). Returns how many were restored.

    Raises:
        CheckpointError: a placeholder is malformed, or the checkpoint lacks a tensor it names.
    """
    import torch.distributed.checkpoint as dcp

    found = [(c, k) for c, k, _ in _walk(state, "") if is_placeholder(c[k])]
    if not found:
        return 0
    destinations: dict[str, Any] = {}
    for container, key in found:
        entry = container[key]
        try:
            store_key = str(entry[PLACEHOLDER])
            shape = tuple(int(s) for s in entry["shape"])
            dtype = getattr(torch, str(entry["dtype"]))
            if not isinstance(dtype, torch.dtype) or not shape:
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"The checkpoint's {owner} state holds a malformed reference {entry!r}; it is damaged.") from None
        destinations[store_key] = _empty_sharded(shape, dtype, mesh, dim)
    try:
        dcp.load({"state_dict": destinations}, checkpoint_id=checkpoint_dir)
    except Exception as exc:  # noqa: BLE001 - DCP raises several types for a missing or unreadable entry
        raise CheckpointError(
            f"The distributed checkpoint {str(checkpoint_dir)!r} lacks the {owner} tensors its metadata names, or they "
            f"cannot be read ({type(exc).__name__}: {str(exc)[:300]}); it is damaged or incomplete. Resume from "
            "another checkpoint."
        ) from None
    for container, key in found:
        container[key] = destinations[container[key][PLACEHOLDER]]
    return len(found)


def shard_mesh_dim(tensor) -> int:
    """The mesh dimension a DTensor is sharded over (on its dim 0); ConfigError for other layouts."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = [i for i, p in enumerate(tensor.placements) if isinstance(p, Shard)]
    if len(sharded) != 1 or tensor.placements[sharded[0]].dim != 0 or not all(
        isinstance(p, Replicate) for i, p in enumerate(tensor.placements) if i != sharded[0]
    ):
        raise ConfigError(
            f"A parameter is a DTensor with placements {tensor.placements}: cl-plugin merges FSDP2 parameters "
            "sharded on dim 0 over one mesh dimension (fully_shard, HSDP). Tensor parallelism is not supported: use "
            "ModelParallelStrategy(tensor_parallel_size=1)."
        )
    return sharded[0]


def mesh_of(module: torch.nn.Module) -> tuple[Any, int] | None:
    """(device mesh, shard mesh dimension) of the first ``DTensor`` parameter of ``module``; None without one."""
    for p in module.parameters():
        if is_dtensor(p):
            return p.device_mesh, shard_mesh_dim(p)
    return None
