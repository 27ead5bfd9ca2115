"""Random selection: per parameter, the entry of one task chosen uniformly at random.

The MagMax paper's baseline (Marczak et al., ECCV 2024, Sec. 4,
https://arxiv.org/abs/2407.06322): instead of the entry of largest magnitude,
each parameter takes the entry of a random task. Default scale 1.0.

Streaming by reservoir sampling (Vitter, 1985): when task t arrives, each
entry is replaced by τ_t's with probability 1/t. After T tasks every task is
the source of an entry with probability 1/T, independently per entry, without
keeping the earlier task vectors.

The random stream of task t is a pure function of (``seed``, t): identical on
every process of a DDP run, and a merger restored from :meth:`state_dict`
continues exactly.
"""

from __future__ import annotations

import numbers

import torch

from cl_plugin.errors import ConfigError
from cl_plugin.merging._kernels import random_fold_
from cl_plugin.merging.base import Merger
from cl_plugin.merging.registry import register_merger
from cl_plugin.task_vectors import TaskVector

__all__ = ["RandomMerger"]

_GOLDEN = 0x9E3779B97F4A7C15


def task_seed(seed: int, task_index: int) -> int:
    """The generator seed for the ``task_index``-th update (0-based), in [0, 2**63)."""
    return (seed * _GOLDEN + task_index + 1) % (1 << 63)


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

    def _fold(self, tv: TaskVector) -> None:
        merged = self._state["merged"]
        if self.num_tasks == 0:
            for n, t in tv.items():
                merged[n].copy_(t)
            return
        keep_probability = 1.0 / (self.num_tasks + 1)
        device = self.device
        generator = torch.Generator(device=device).manual_seed(task_seed(self.seed, self.num_tasks))
        for n, t in tv.items():
            random_fold_(merged[n], t, keep_probability, generator)

    def _finalize(self):
        return {n: t.clone() for n, t in self._state["merged"].items()}
