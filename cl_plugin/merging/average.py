"""Weight averaging of task vectors: merged = (1/T) Σ_t τ_t.

Model soups / weight averaging (Wortsman et al., ICML 2022,
https://arxiv.org/abs/2203.05482) applied to task vectors; the MagMax paper's
"Avg" baseline. Default scale 1.0, so θ₀ + merged is the mean of the
fine-tuned models.

Streaming: a running sum (float32 for 16-bit inputs) divided by the count in
:meth:`merged`.
"""

from __future__ import annotations

from cl_plugin.merging.registry import register_merger
from cl_plugin.merging.task_arithmetic import TaskArithmeticMerger

__all__ = ["AverageMerger"]


@register_merger("average")
class AverageMerger(TaskArithmeticMerger):
    """Streaming average of task vectors (the running sum of task arithmetic, divided by T).

    Args:
        scale: λ for :meth:`apply_to` (default 1.0).

    State: ``sum.<name>`` (float32 for 16-bit inputs, else the input dtype).

    Example:
        >>> import torch
        >>> m = AverageMerger()
        >>> m.update({"w": torch.tensor([1.0, -3.0])})
        >>> m.update({"w": torch.tensor([3.0, 1.0])})
        >>> m.merged()["w"]
        tensor([ 2., -1.])
    """

    name = "average"
    default_scale = 1.0
    # The fold is task arithmetic's; the finalisation divides tensor by tensor.
    streams = True
    finalizes_by_tensor = True
    def _finalize(self):
        return {n: t / self.num_tasks for n, t in self._state["sum"].items()}

    def _finalize_one(self, name):
        return self._state["sum"][name] / self.num_tasks
