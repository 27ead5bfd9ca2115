"""Continual-learning metrics: the accuracy matrix and the figures derived from it.

:class:`AccuracyMatrix` is a torchmetrics ``Metric`` (no Lightning import) whose
state syncs across processes; :mod:`cl_plugin.metrics.functional` holds the
same figures as pure functions of a matrix, with their definitions;
:func:`mask_to_classes` turns class-incremental logits into task-aware ones.
``docs/metrics.md`` describes them all.
"""

from cl_plugin.metrics.accuracy_matrix import AccuracyMatrix
from cl_plugin.metrics.functional import (
    average_accuracy,
    bwt,
    forgetting,
    fwt,
    max_forgetting,
)
from cl_plugin.metrics.task_aware import mask_to_classes

__all__ = [
    "AccuracyMatrix",
    "average_accuracy",
    "bwt",
    "forgetting",
    "fwt",
    "mask_to_classes",
    "max_forgetting",
]
