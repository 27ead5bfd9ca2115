"""Continual-learning streams and the glue that feeds them to Lightning.

- :func:`split_digits`, :func:`permuted_digits`, :func:`rotated_digits`:
  Avalanche benchmarks built from scikit-learn's bundled digits (no download);
- :func:`benchmark_by_name`: those, or Avalanche's SplitMNIST, PermutedMNIST,
  RotatedMNIST, SplitFMNIST, SplitCIFAR100, SplitCUB200 and CORe50 from local
  files;
- :class:`ContinualDataModule`: any Avalanche benchmark (or its name) as a
  LightningDataModule, one experience at a time, with Lightning's batches
  ``x, y`` by default or Avalanche's ``x, y, task_label``; its training loader
  (:class:`ResumableDataLoader`) resumes a checkpoint written mid-epoch
  exactly, and :func:`resumes_mid_epoch` tells whether a loader does.

Only :mod:`cl_plugin.benchmarks.datamodule` imports Lightning, and it is
imported on first use of one of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cl_plugin.benchmarks.digits import (
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    DIGITS_VALIDATION_FRACTION,
    DigitsSplit,
    load_digits_tensors,
    permuted_digits,
    rotated_digits,
    split_digits,
)
from cl_plugin.benchmarks.registry import (
    BENCHMARK_NAMES,
    EMBEDDED_BENCHMARKS,
    MissingDatasetError,
    benchmark_by_name,
)

if TYPE_CHECKING:
    from cl_plugin.benchmarks.datamodule import (
        BATCH_FORMATS,
        ContinualDataModule,
        ResumableDataLoader,
        ResumableSampler,
        resumes_mid_epoch,
    )

# Names served lazily from cl_plugin.benchmarks.datamodule (it imports Lightning).
_DATAMODULE_NAMES = (
    "BATCH_FORMATS",
    "ContinualDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "resumes_mid_epoch",
)

__all__ = [
    "BATCH_FORMATS",
    "BENCHMARK_NAMES",
    "EMBEDDED_BENCHMARKS",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "DIGITS_VALIDATION_FRACTION",
    "ContinualDataModule",
    "DigitsSplit",
    "MissingDatasetError",
    "ResumableDataLoader",
    "ResumableSampler",
    "benchmark_by_name",
    "load_digits_tensors",
    "permuted_digits",
    "resumes_mid_epoch",
    "rotated_digits",
    "split_digits",
]


def __getattr__(name: str) -> Any:
    if name in _DATAMODULE_NAMES:
        from cl_plugin.benchmarks import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
