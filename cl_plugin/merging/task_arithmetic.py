"""Task arithmetic: merged = Σ_t τ_t, applied with a small scale.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023
(https://arxiv.org/abs/2212.04089). Default scale 0.3, the value the paper's
multi-task experiments select most often on held-out data.

Streaming: a running sum (float32 for 16-bit inputs). A task vector whose
finite entries would overflow the sum is refused before anything is added
(see :attr:`~cl_plugin.merging.base.Merger.summed_roles`).
"""

from __future__ import annotations

from cl_plugin.merging.base import Merger
from cl_plugin.merging.registry import register_merger
from cl_plugin.task_vectors import TaskVector

__all__ = ["TaskArithmeticMerger"]


@register_merger("task_arithmetic")
class TaskArithmeticMerger(Merger):
    """Streaming sum of task vectors.

    Args:
        scale: λ for :meth:`apply_to` (default 0.3).

    State: ``sum.<name>`` (float32 for 16-bit inputs, else the input dtype).

    Example:
        >>> import torch
        >>> m = TaskArithmeticMerger()
        >>> m.update({"w": torch.tensor([1.0, -3.0])})
        >>> m.update({"w": torch.tensor([3.0, 1.0])})
        >>> m.merged()["w"]
        tensor([ 4., -2.])
    """

    name = "task_arithmetic"
    default_scale = 0.3
    tensor_states = {"sum": "accumulate"}
    summed_roles = ("sum",)

    streams = True
    finalizes_by_tensor = True

    def _fold(self, tv: TaskVector) -> None:
        for total, incoming in self._runs(tv, "sum"):
            self._fold_chunk(False, total, incoming)

    def _fold_chunk(self, first: bool, total, incoming) -> None:
        total.add_(incoming)  # the first task into zeros, as every later one

    def _finalize(self):
        return {n: t.clone() for n, t in self._state["sum"].items()}

    def _finalize_one(self, name):
        return self._state["sum"][name]
