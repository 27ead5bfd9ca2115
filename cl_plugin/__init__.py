"""cl-plugin: continual learning for PyTorch Lightning by merging task vectors.

The algorithms live here as plain torch functions on state dicts (no Lightning
import); the Lightning callbacks live in :mod:`cl_plugin.callbacks`.
"""

__version__ = "0.1.0"

from cl_plugin.errors import (  # noqa: E402
    ClPluginError,
    ConfigError,
    DtypeMismatchError,
    NonFiniteError,
    StateDictMismatchError,
)
from cl_plugin.task_vectors import TaskVector  # noqa: E402

__all__ = [
    "__version__",
    "TaskVector",
    "ClPluginError",
    "ConfigError",
    "DtypeMismatchError",
    "NonFiniteError",
    "StateDictMismatchError",
]
