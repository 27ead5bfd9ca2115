"""Continual-learning metrics: the accuracy matrix and the figures derived from it.

:class:`AccuracyMatrix` is a torchmetrics ``Metric`` (no Lightning import) whose
state syncs across processes; :mod:`cl_plugin.metrics.functional` holds the
same figures as pure functions of a matrix, with their definitions.
"""

from cl_plugin.metrics.accuracy_matrix import AccuracyMatrix
from cl_plugin.metrics.functional import (
    average_accuracy,
    bwt,
    forgetting,
    fwt,
    max_forgetting,
)

__all__ = [
    "AccuracyMatrix",
    "average_accuracy",
    "bwt",
    "forgetting",
    "fwt",
    "max_forgetting",
]
