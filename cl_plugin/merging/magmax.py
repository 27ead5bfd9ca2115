"""MagMax: per parameter, keep the task-vector entry of largest magnitude.

Marczak, Twardowski, Trzciński, Cygert. "MagMax: Leveraging Model Merging for
Seamless Continual Learning", ECCV 2024 (https://arxiv.org/abs/2407.06322).
Reference code: github.com/danielm1405/magmax, ``src/merging.py`` (the
``max_abs`` selection over stacked task vectors).

Rule: merged[i] = τ_k[i] with k = argmax_t |τ_t[i]|, sign kept; the model is
θ₀ + λ·merged with λ = 0.5 by default (the paper's choice for sequential
fine-tuning). Ties go to the later task (``>=``).

Differences from the reference: streaming (one running maximum instead of a
stack of all task vectors), so memory does not grow with the number of tasks;
the selection gives identical values because ``max`` over a stack and a
running ``>=`` pick the same entry.
"""

from __future__ import annotations

from cl_plugin.merging._kernels import magmax_fold_
from cl_plugin.merging.base import Merger
from cl_plugin.merging.registry import register_merger
from cl_plugin.task_vectors import TaskVector

__all__ = ["MagMaxMerger"]


@register_merger("magmax")
class MagMaxMerger(Merger):
    """Streaming MagMax.

    Args:
        scale: λ for :meth:`apply_to` (default 0.5).

    State: ``merged.<name>``, each in the input's dtype and shape.

    Example:
        >>> import torch
        >>> m = MagMaxMerger()
        >>> m.update({"w": torch.tensor([1.0, -3.0, 2.0])})
        >>> m.update({"w": torch.tensor([-2.0, 1.0, 2.0])})
        >>> m.merged()["w"]
        tensor([-2., -3.,  2.])
    """

    name = "magmax"
    default_scale = 0.5
    tensor_states = {"merged": "same"}
    merged_role = "merged"

    streams = True

    def _fold(self, tv: TaskVector) -> None:
        first = not self.num_tasks
        for merged, incoming in self._runs(tv, "merged"):
            self._fold_chunk(first, merged, incoming)

    def _fold_chunk(self, first: bool, merged, incoming) -> None:
        if first:
            merged.copy_(incoming)
        else:
            magmax_fold_(merged, incoming)

    def _finalize(self):
        return {n: t.clone() for n, t in self._state["merged"].items()}
