"""Random selection: per parameter, the entry of one task chosen uniformly at random.

The MagMax paper's baseline (Marczak et al., ECCV 2024, Sec. 4,
https://arxiv.org/abs/2407.06322): instead of the entry of largest magnitude,
each parameter takes the entry of a random task. Default scale 1.0.

Streaming by reservoir sampling (Vitter, 1985): when task t arrives, each
entry is replaced by τ_t's with probability 1/t. After T tasks every task is
the source of an entry with probability 1/T, independently per entry, without
keeping the earlier task vectors.

The draw of each entry is a pure function of (``seed``, task, tensor name,
the entry's index in the flattened tensor): a counter-based stream
(:func:`~cl_plugin.merging._kernels.splitmix_draws`), so the merge is the
same whether a tensor is drawn whole or as shards at any offset, on any
number of processes, and a merger restored from :meth:`state_dict` continues
exactly. (States written by cl-plugin before this scheme still load; their
later tasks draw with it.)
"""

from __future__ import annotations

import hashlib
import numbers


from cl_plugin.errors import ConfigError
from cl_plugin.merging._kernels import DRAW_BITS, random_select_
from cl_plugin.merging.base import Merger
from cl_plugin.merging.registry import register_merger
from cl_plugin.task_vectors import TaskVector

__all__ = ["RandomMerger"]

def draw_key(seed: int, task_index: int, name: str) -> int:
    """The 64-bit key of the draws of tensor ``name`` in the ``task_index``-th update (0-based)."""
    text = f"{seed}\x00{task_index}\x00{name}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8, person=b"cl-plugin-rand").digest(), "little")


@register_merger("random")
class RandomMerger(Merger):
    """Streaming random selection.

    Args:
        seed: seed of the per-task random streams (default 0). Use the same
            value on every process.
        scale: λ for :meth:`apply_to` (default 1.0).

    State: ``merged.<name>`` in the input's dtype.

    Example:
        >>> import torch
        >>> m = RandomMerger(seed=0)
        >>> m.update({"w": torch.full((4,), 1.0)})
        >>> m.update({"w": torch.full((4,), 2.0)})
        >>> sorted(set(m.merged()["w"].tolist())) in ([1.0], [2.0], [1.0, 2.0])
        True
    """

    name = "random"
    default_scale = 1.0
    tensor_states = {"merged": "same"}
    merged_role = "merged"

    def __init__(self, *, seed: int = 0, scale: float | None = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ConfigError(f"`seed` must be a non-negative integer, got {seed!r} (RandomMerger).")
        self.seed = int(seed)
        super().__init__(scale=scale)

    def options(self):
        return {"seed": self.seed}

    streams = True
    chunk_pieces = True

    def _fold(self, tv: TaskVector) -> None:
        merged = self._state["merged"]
        if self._copy_first_task(tv):
            return
        threshold = self._threshold()
        for n, t in tv.items():
            random_select_(merged[n], t, threshold, draw_key(self.seed, self.num_tasks, n), self._offset(n))

    def _fold_chunk(self, first: bool, merged, incoming, *, pieces) -> None:
        if first:
            merged.copy_(incoming)
            return
        threshold, at = self._threshold(), 0
        for n, offset, length in pieces:
            key = draw_key(self.seed, self.num_tasks, n)
            random_select_(merged[at : at + length], incoming[at : at + length], threshold, key, self._offset(n) + offset)
            at += length

    def _threshold(self) -> int:
        # Reservoir sampling: the new task takes each entry with probability 1/t.
        return (1 << DRAW_BITS) // (self.num_tasks + 1)

    def _offset(self, name: str) -> int:
        """Where this rank's slice of ``name`` starts in the whole flattened tensor (its draws' index)."""
        layout = self.layout
        return layout[name].start if layout is not None and layout.distributed else 0

    def _finalize(self):
        return {n: t.clone() for n, t in self._state["merged"].items()}
