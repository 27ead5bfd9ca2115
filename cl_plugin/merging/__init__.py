"""Merging methods for task vectors, each a streaming class registered by name.

>>> from cl_plugin.merging import MERGERS, get_merger, merge
>>> sorted(MERGERS)
['average', 'dop', 'fisher', 'magmax', 'opcm', 'random', 'task_arithmetic', 'ties']

Every merger folds one task vector at a time (``update``) into a state whose
size does not grow with the number of tasks, returns the merged task vector
(``merged``, unscaled), and checkpoints with ``state_dict``/``load_state_dict``.
Every method also takes DARE (``get_merger(name, dare=p, dare_seed=s)``);
``"fisher"`` needs each task's diagonal Fisher (``update(tv, fisher=...)``).
"""

from cl_plugin.merging.base import Merger
from cl_plugin.merging.registry import MERGERS, get_merger, merge, register_merger

# Importing a method's module registers it.
from cl_plugin.merging.magmax import MagMaxMerger  # noqa: E402  (isort: skip)
from cl_plugin.merging.random_selection import RandomMerger  # noqa: E402
from cl_plugin.merging.task_arithmetic import TaskArithmeticMerger  # noqa: E402
from cl_plugin.merging.average import AverageMerger  # noqa: E402
from cl_plugin.merging.ties import TiesMerger  # noqa: E402
from cl_plugin.merging.opcm import OPCMMerger  # noqa: E402
from cl_plugin.merging.dop import DOPMerger  # noqa: E402
from cl_plugin.merging.fisher import FisherMerger, diagonal_fisher  # noqa: E402

__all__ = [
    "MERGERS",
    "Merger",
    "get_merger",
    "merge",
    "register_merger",
    "MagMaxMerger",
    "RandomMerger",
    "AverageMerger",
    "TaskArithmeticMerger",
    "TiesMerger",
    "OPCMMerger",
    "DOPMerger",
    "FisherMerger",
    "diagonal_fisher",
]
