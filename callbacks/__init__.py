"""Lightning callbacks of cl-plugin (installed as ``cl_plugin.callbacks``).

Each callback does one job at task boundaries and calls the plain-torch
algorithms in :mod:`cl_plugin`.
"""

from cl_plugin.callbacks._boundaries import TaskBoundaryCallback
from cl_plugin.callbacks.adapters import LoRAAdapters, SharedSubspaceAdapters
from cl_plugin.callbacks.class_incremental import ClassIncrementalMasking
from cl_plugin.callbacks.evaluation import ContinualEvaluation
from cl_plugin.callbacks.model_merging import ModelMerging

__all__ = [
    "ClassIncrementalMasking",
    "ContinualEvaluation",
    "LoRAAdapters",
    "ModelMerging",
    "SharedSubspaceAdapters",
    "TaskBoundaryCallback",
]
