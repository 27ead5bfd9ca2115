"""A LightningDataModule that serves an Avalanche benchmark one experience at a time.

The only module of :mod:`cl_plugin.benchmarks` that imports Lightning.

Two ways to run a stream (``ARCHITECTURE.md``, "Task boundaries"):

1. **One ``trainer.fit`` over the whole stream.** Epoch ``e`` trains on
   experience ``e // epochs_per_experience``; the Trainer must rebuild the
   training dataloader every epoch::

       dm = ContinualDataModule(split_digits(), epochs_per_experience=3)
       trainer = Trainer(reload_dataloaders_every_n_epochs=1, max_epochs=dm.total_epochs)
       trainer.fit(model, datamodule=dm)

2. **One ``fit`` per experience**, in the user's own loop: call
   :meth:`ContinualDataModule.set_experience` before each ``fit``; the epoch
   then no longer chooses the experience.

Batches. With ``batch_format="lightning"`` (the default) every batch is
``x, y`` and validation and test each have one loader, so a LightningModule
written as Lightning's documentation writes one (``x, y = batch``, one
``validation_step`` without ``dataloader_idx``) runs unchanged. With
``batch_format="avalanche"`` every batch is ``x, y, task_label`` and there is
one validation and one test loader per experience. Whatever the format,
:meth:`ContinualDataModule.experience_dataloaders` gives one loader per
experience. The batch shape does not depend on the benchmark: Avalanche 0.6's
classic generators (``nc_benchmark``, ``SplitMNIST``, ...) yield items
``(x, y, task_label)``, its newer ones (``class_incremental_benchmark``,
``new_instances_benchmark``, ``benchmark_from_datasets``) ``(x, y)``; the
datamodule drops or adds the task label as the format asks. An item without
one gets its experience's task label when Avalanche knows it
(``experience.task_label``), else 0.

Order and resume. The training loader is a :class:`ResumableDataLoader`
over a :class:`ResumableSampler`, a ``DistributedSampler(shuffle=True,
seed=seed)`` whose order is a pure function of ``(seed, epoch)``; Lightning
calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint
written at an epoch end sees exactly the batches an uninterrupted run would
(a DataLoader with a seeded ``generator`` does not: each new iterator draws
from it). A checkpoint written in the middle of an epoch
(``ModelCheckpoint(every_n_train_steps=...)``, ``save_on_exception=True``)
resumes exactly too: Lightning stores the ``state_dict()`` of every training
loader that has one in the checkpoint (``loops.fit_loop.state_dict.
combined_loader``) and, on a mid-epoch restart, calls its ``load_state_dict``
before the first batch is drawn; the loader records the epoch and the number of
batches Lightning finished in it, and the sampler then starts that epoch after
them. :func:`resumes_mid_epoch` tells whether a training loader can do this.

Under DDP the sampler takes ``num_replicas``/``rank`` from the Trainer, so
each rank trains on its own shard (and, after a mid-epoch resume, continues
its own shard from the same batch: every rank has done the same number of
batches); Lightning leaves a ``DistributedSampler`` in place whatever
``use_distributed_sampler`` says. The evaluation loaders are plain,
unshuffled loaders; under DDP Lightning gives them its own distributed
sampler (``use_distributed_sampler=True``, the default), which pads the last
shard with a few repeated examples.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from cl_plugin.errors import CheckpointError, ConfigError, did_you_mean

__all__ = ["BATCH_FORMATS", "ContinualDataModule", "ResumableDataLoader", "ResumableSampler", "resumes_mid_epoch"]

_EVAL_ON = ("seen", "all")
#: The values of ``ContinualDataModule(batch_format=...)``.
BATCH_FORMATS = ("lightning", "avalanche")
_SPLITS = ("test", "val")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"`{name}` must be an int, got {value!r} (ContinualDataModule).")
    if value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}, got {value!r} (ContinualDataModule).")


def _stream(benchmark: Any, stream_name: str) -> list[Any]:
    stream = getattr(benchmark, stream_name, None)
    if stream is None:
        raise ConfigError(
            f"`benchmark` has no `{stream_name}` (got {type(benchmark).__name__}). ContinualDataModule takes an "
            "Avalanche benchmark, e.g. `split_digits()` or `avalanche.benchmarks.SplitMNIST(...)`, or a name "
            "that `benchmark_by_name` knows, e.g. 'split_digits'."
        )
    return list(stream)


def _task_label_of(experience: Any) -> int:
    """The experience's task label when Avalanche knows a single one, else 0."""
    try:
        label = experience.task_label  # Avalanche raises when an experience has several
    except (AttributeError, ValueError, TypeError):
        return 0
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        return 0
    return int(label)


class _Items(Dataset):
    """An experience's dataset whose items are ``(x, y)`` or ``(x, y, task_label)``, whatever it yields.

    Avalanche's classic datasets yield ``(x, y, task_label)``, its newer
    generators ``(x, y)``. An item of three or more fields carries its task
    label in the third; an item of two gets ``task_label``. ``collate_fn`` is
    the wrapped dataset's, so Avalanche's own collation still applies.

    Args:
        dataset: the experience's dataset.
        with_task_labels: items ``(x, y, task_label)`` if True, ``(x, y)`` if False.
        task_label: the task label of items that carry none.
    """

    def __init__(self, dataset: Dataset, with_task_labels: bool, task_label: int) -> None:
        self.dataset = dataset
        self.with_task_labels = with_task_labels
        self.task_label = task_label
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if not isinstance(item, Sequence) or isinstance(item, (str, bytes)) or len(item) < 2:
            raise ConfigError(
                f"ContinualDataModule serves items (x, y) or (x, y, task_label), as Avalanche's classification "
                f"datasets yield them; item {index} of {type(self.dataset).__name__} is a "
                f"{type(item).__name__}{f' of {len(item)} field(s)' if isinstance(item, Sequence) else ''}."
            )
        if not self.with_task_labels:
            return item[0], item[1]
        return item[0], item[1], item[2] if len(item) > 2 else self.task_label


def _classes_of(experience: Any) -> list[int]:
    """Sorted classes of an experience, from Avalanche's field or else from the dataset's targets."""
    try:
        classes = experience.classes_in_this_experience
    except AttributeError:
        classes = None
    if classes is None:
        targets = getattr(experience.dataset, "targets", None)
        classes = [] if targets is None else {int(t) for t in targets}
    return sorted(int(c) for c in classes)


# ---------------------------------------------------------------------- exact mid-epoch resume

#: Version of :meth:`ResumableDataLoader.state_dict`'s format.
LOADER_STATE_VERSION = 1
# Settings a saved position is only valid for: the loader's own value must match the saved one.
_POSITION_SETTINGS = ("batch_size", "dataset_size", "num_replicas", "seed", "drop_last", "experience")


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` that can begin an epoch part-way through its shard.

    The order of epoch ``e`` is ``DistributedSampler``'s: a pure function of
    ``(seed, e)``, this rank's shard of it. :meth:`start_epoch_at` makes the
    next pass over epoch ``e`` skip the first ``position`` indices of the
    shard (once); :attr:`position` counts the indices handed out in the
    current pass. ``len()`` is always the whole shard, as Lightning expects of
    a resumed loader (it counts the batches already done itself).

    Args: those of :class:`torch.utils.data.DistributedSampler`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start: tuple[int, int] | None = None  # (epoch, first shard position), used once
        #: Shard indices handed out so far in the current pass (after any skipped ones).
        self.position = 0

    def start_epoch_at(self, epoch: int, position: int) -> None:
        """Set the epoch to ``epoch`` and make its next pass begin at shard position ``position``."""
        self.set_epoch(int(epoch))
        self._start = (int(epoch), int(position))

    @override
    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._start = self._start, None
        first = start[1] if start is not None and start[0] == self.epoch else 0
        return self._count(indices, first)

    def _count(self, indices: list[int], first: int) -> Iterator[int]:
        self.position = first
        for index in indices[first:]:
            self.position += 1
            yield index


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in an epoch is saved in Lightning checkpoints and restored exactly.

    Lightning saves ``state_dict()`` of each training loader that has one and,
    when ``fit(ckpt_path=...)`` restarts in the middle of an epoch, calls
    ``load_state_dict`` before the first batch is drawn. The state is the
    sampler's epoch and the number of batches finished in it; on load the
    sampler skips exactly those, so the resumed epoch goes on with the batches
    the uninterrupted run would have seen. Under DDP every rank loads rank 0's
    state (the batch count is the same on every rank) and goes on in its own
    shard.

    Args:
        dataset: the dataset.
        batch_size: batch size (default 1, as DataLoader's).
        sampler: a :class:`ResumableSampler` over ``dataset``.
        batches_done: optional ``f(loader) -> int | None``: how many batches of
            the current epoch the owner counts as finished (ContinualDataModule
            asks its Trainer, which does not count a batch whose step raised).
            None, or when it returns None: the batches the sampler has handed
            out, which is exact when batches are drawn one at a time
            (``num_workers=0``).
        experience: the experience served, saved so that a position is never
            applied to another experience's loader (None: not checked).
        **kwargs: passed to :class:`~torch.utils.data.DataLoader` (``num_workers``,
            ``collate_fn``, ...); ``shuffle`` and ``batch_sampler`` are not accepted.

    Raises:
        ConfigError: ``sampler`` is not a :class:`ResumableSampler`; in
            :meth:`load_state_dict`, a position saved with other settings (each
            difference is named).
        CheckpointError: in :meth:`load_state_dict`, a state that is not one.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        *,
        sampler: ResumableSampler,
        batches_done: Callable[[ResumableDataLoader], int | None] | None = None,
        experience: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise ConfigError(
                f"`sampler` must be a ResumableSampler, got {type(sampler).__name__} (ResumableDataLoader). Build "
                "one with ResumableSampler(dataset, num_replicas=..., rank=..., shuffle=True, seed=...)."
            )
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._batches_done = batches_done
        self.experience = experience

    def _settings(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "batch_size": self.batch_size,
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
            "drop_last": bool(self.drop_last),
            "experience": self.experience,
        }

    def _finished_batches(self) -> int:
        done = self._batches_done(self) if self._batches_done is not None else None
        if done is None:
            done = math.ceil(self.sampler.position / self.batch_size)
        return int(done)

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the batches finished in it, and the settings that position is valid for (plain values)."""
        return {
            "format_version": LOADER_STATE_VERSION,
            "epoch": int(self.sampler.epoch),
            "batches_done": self._finished_batches(),
            **self._settings(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Make the next pass over the saved epoch begin after its finished batches.

        Everything is checked before the sampler is touched.
        """
        if not isinstance(state_dict, Mapping):
            raise CheckpointError(f"The saved training-loader state must be a dict, got {type(state_dict).__name__}.")
        version = state_dict.get("format_version")
        if version != LOADER_STATE_VERSION:
            raise CheckpointError(
                f"Unknown training-loader state format_version={version!r}; this version of cl-plugin reads "
                f"{LOADER_STATE_VERSION}."
            )
        required = ("epoch", "batches_done", *_POSITION_SETTINGS)
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise CheckpointError(f"The saved training-loader state lacks {missing} (it has {sorted(state_dict)}).")
        epoch, done = state_dict["epoch"], state_dict["batches_done"]
        for name, value in (("epoch", epoch), ("batches_done", done)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise CheckpointError(f"The saved training-loader state has {name}={value!r}; expected an int >= 0.")
        ours = self._settings()
        different = [
            f"{k}={state_dict[k]!r} (this loader: {ours[k]!r})" for k in _POSITION_SETTINGS if state_dict[k] != ours[k]
        ]
        if different:
            raise ConfigError(
                f"The checkpoint's training-loader position (epoch {epoch}, {done} batches done) was saved with "
                f"other settings: {', '.join(different)}. Resume with the settings of the interrupted run, or from "
                "a checkpoint written at the end of an epoch (it needs no position)."
            )
        n_batches = len(self)
        if done > n_batches:
            raise CheckpointError(
                f"The saved training-loader state has batches_done={done}, but an epoch has {n_batches} batches."
            )
        if done == n_batches:  # the epoch was finished: Lightning goes on with the next one
            self.sampler.set_epoch(int(epoch) + 1)
        else:
            self.sampler.start_epoch_at(int(epoch), int(done) * self.batch_size)


def _flatten_loaders(loader: object) -> list[object]:
    flattened = getattr(loader, "flattened", None)  # Lightning's CombinedLoader
    if isinstance(flattened, list):
        return flattened
    if isinstance(loader, Mapping):
        return [leaf for value in loader.values() for leaf in _flatten_loaders(value)]
    if isinstance(loader, (list, tuple)):
        return [leaf for value in loader for leaf in _flatten_loaders(value)]
    return [loader]


def resumes_mid_epoch(loader: object) -> bool:
    """Whether a training loader continues an interrupted epoch exactly when Lightning resumes mid-epoch.

    True for a :class:`ResumableDataLoader` (what :class:`ContinualDataModule`
    trains with), and for any loader that implements Lightning's
    ``state_dict``/``load_state_dict`` protocol for loaders (e.g. torchdata's
    ``StatefulDataLoader``), which is taken at its word. False for a plain
    ``DataLoader``, whatever its sampler: Lightning then starts the epoch's
    order again and only skips as many batches as were done, so a resumed run
    trains on other batches than the uninterrupted one. ``loader`` may be a
    Lightning ``CombinedLoader`` or a list/tuple/dict of loaders (all must
    qualify); None is False.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> from cl_plugin.benchmarks import ContinualDataModule, split_digits
        >>> resumes_mid_epoch(ContinualDataModule(split_digits(2)).train_dataloader())
        True
        >>> resumes_mid_epoch(DataLoader(list(range(8)), shuffle=True))
        False
    """
    if loader is None:
        return False
    leaves = _flatten_loaders(loader)
    if not leaves:
        return False
    return all(
        isinstance(leaf, ResumableDataLoader)
        or (callable(getattr(leaf, "state_dict", None)) and callable(getattr(leaf, "load_state_dict", None)))
        for leaf in leaves
    )


class ContinualDataModule(LightningDataModule):
    """Serve an Avalanche benchmark to a Lightning Trainer, experience by experience.

    Batches, whatever the benchmark (Avalanche's classic generators yield
    items ``(x, y, task_label)``, its newer ones ``(x, y)``):

    ==================  ==========================  ==============================================
    ``batch_format``    every batch                 ``val_dataloader()`` / ``test_dataloader()``
    ==================  ==========================  ==============================================
    ``"lightning"``     ``x, y``                    one loader over the evaluated experiences /
                                                    one loader over every test experience
    ``"avalanche"``     ``x, y, task_label``        one loader per evaluated / test experience
    ==================  ==========================  ==============================================

    ``x`` and ``y`` are what the benchmark's dataset yields, collated (for the
    digits streams, float32 ``(N, 1, 8, 8)`` and int64 ``(N,)``);
    ``task_label`` is an int64 ``(N,)`` tensor: the item's own task label, or,
    for an item without one, its experience's task label when Avalanche knows
    it (``experience.task_label``), else 0. :meth:`experience_dataloaders`
    gives one loader per experience in either format (what
    ``ContinualEvaluation`` reads).

    Args:
        benchmark: any Avalanche 0.6 benchmark with a ``train_stream`` and a
            ``test_stream`` (class-, domain- or task-incremental), e.g.
            :func:`~cl_plugin.benchmarks.split_digits`, or the name of one that
            :func:`~cl_plugin.benchmarks.benchmark_by_name` builds
            (``"split_digits"``, ``"split_mnist"``, ...), which is how a
            LightningCLI YAML file names it.
        batch_size: batch size of every loader (default 32).
        epochs_per_experience: epochs spent on each experience in one ``fit``
            over the stream (default 1).
        num_workers: DataLoader workers (default 0).
        eval_on: ``"seen"`` (default): :meth:`val_dataloader` serves the
            experiences trained so far, ``0..current_experience``; ``"all"``:
            every experience. Validation uses the benchmark's ``valid_stream``
            when it has one with one experience per training experience, and
            the ``test_stream`` otherwise. When the evaluation stream has a
            different number of experiences (CORe50's single test set), all of
            it is served.
        seed: seed of the training sampler; the order of an epoch is a pure
            function of ``(seed, epoch)``.
        batch_format: ``"lightning"`` (default) or ``"avalanche"``, see above.
        eval_batch_size: batch size of the validation and test loaders
            (default None: ``batch_size``); a larger one evaluates faster.
        benchmark_options: keyword arguments for
            :func:`~cl_plugin.benchmarks.benchmark_by_name` when ``benchmark``
            is a name, e.g. ``{"n_experiences": 5, "seed": 0}`` or
            ``{"dataset_root": "/data"}``; None (default) for none.

    Attributes:
        benchmark: the benchmark given or built (None in a copy unpickled in
            another process: Avalanche's scenarios do not pickle, so only their
            experience datasets travel).
        benchmark_name: the name given, or None when a benchmark object was.
        benchmark_options: the options given (a dict, empty for none).
        epochs_per_experience, batch_size, eval_batch_size, num_workers, eval_on, seed,
        batch_format: as given.
        classes_in_experience: per training experience, its sorted classes.

    Raises:
        ConfigError: a bad argument (an unknown ``batch_format`` or benchmark
            name among them), ``benchmark_options`` with a benchmark object, a
            benchmark without ``train_stream`` or ``test_stream``, or an empty
            stream; at ``fit``, a Trainer that does not reload dataloaders
            every epoch or that would run past the end of the stream (the
            message says what to pass to ``Trainer``).
        MissingDatasetError: a benchmark named with files that are not on disk
            (from :func:`~cl_plugin.benchmarks.benchmark_by_name`).

    Example:
        >>> from cl_plugin.benchmarks import split_digits
        >>> dm = ContinualDataModule(split_digits(n_experiences=5), epochs_per_experience=2)
        >>> dm.n_experiences, dm.total_epochs, dm.experience_for_epoch(5)
        (5, 10, 2)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), sorted(set(y.tolist())) == dm.classes_in_experience[0]
        ((32, 1, 8, 8), True)
        >>> len(dm.experience_dataloaders("test"))
        5
        >>> by_name = ContinualDataModule("split_digits", batch_format="avalanche",
        ...                               benchmark_options={"n_experiences": 2})
        >>> x, y, t = next(iter(by_name.test_dataloader()[1]))
        >>> len(by_name.test_dataloader()), set(t.tolist())
        (2, {0})
    """

    def __init__(
        self,
        benchmark: Union[str, Any],
        batch_size: int = 32,
        epochs_per_experience: int = 1,
        num_workers: int = 0,
        eval_on: str = "seen",
        seed: int = 0,
        batch_format: str = "lightning",
        benchmark_options: Optional[dict[str, Any]] = None,
        eval_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        self._validate_init(
            benchmark, batch_size, epochs_per_experience, num_workers, eval_on, seed, batch_format, benchmark_options
        )
        options = dict(benchmark_options or {})
        name = benchmark if isinstance(benchmark, str) else None
        if name is not None:
            from cl_plugin.benchmarks.registry import benchmark_by_name

            benchmark = benchmark_by_name(name, **options)
        train_stream = _stream(benchmark, "train_stream")
        test_stream = _stream(benchmark, "test_stream")
        if not train_stream or not test_stream:
            raise ConfigError(
                f"The benchmark's stream is empty: {len(train_stream)} training and {len(test_stream)} test "
                "experiences. Build it with at least one experience."
            )
        valid_stream = getattr(benchmark, "valid_stream", None)
        val_stream = list(valid_stream) if valid_stream is not None else []
        has_validation_stream = len(val_stream) == len(train_stream)
        if not has_validation_stream:
            val_stream = test_stream

        self.benchmark = benchmark
        self.benchmark_name = name
        self.benchmark_options = options
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(batch_size if eval_batch_size is None else eval_batch_size)
        self.epochs_per_experience = int(epochs_per_experience)
        self.num_workers = int(num_workers)
        self.eval_on = eval_on
        self.seed = int(seed)
        self.batch_format = batch_format
        self.classes_in_experience: list[list[int]] = [_classes_of(e) for e in train_stream]
        # Per stream, each experience's dataset (as the benchmark yields it) and task label.
        self._train_sets: list[Dataset] = [e.dataset for e in train_stream]
        self._test_sets: list[Dataset] = [e.dataset for e in test_stream]
        self._val_sets: list[Dataset] = [e.dataset for e in val_stream]
        self._train_labels = [_task_label_of(e) for e in train_stream]
        self._test_labels = [_task_label_of(e) for e in test_stream]
        self._val_labels = [_task_label_of(e) for e in val_stream]
        self._has_validation_stream = has_validation_stream
        self._fixed: int | None = None
        self._current = 0

    def __getstate__(self) -> dict[str, Any]:
        # Avalanche's scenarios hold lambdas and do not pickle, but their
        # experience datasets do: a copy sent to a spawned process (DDP spawn,
        # DataLoader workers under "spawn") keeps the datasets and drops the
        # benchmark object, which nothing here reads after __init__.
        state = self.__dict__.copy()
        state["benchmark"] = None
        return state

    @staticmethod
    def _validate_init(
        benchmark, batch_size, epochs_per_experience, num_workers, eval_on, seed, batch_format, benchmark_options
    ) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("epochs_per_experience", epochs_per_experience, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        if eval_on not in _EVAL_ON:
            raise ConfigError(f"`eval_on` must be one of {list(_EVAL_ON)}, got {eval_on!r} (ContinualDataModule).")
        if batch_format not in BATCH_FORMATS:
            raise ConfigError(
                f"`batch_format` must be one of {list(BATCH_FORMATS)}, got {batch_format!r} (ContinualDataModule): "
                "'lightning' for batches `x, y` and one validation and one test loader, 'avalanche' for batches "
                "`x, y, task_label` and one loader per experience." + did_you_mean(str(batch_format), BATCH_FORMATS)
            )
        if benchmark_options is not None:
            if not isinstance(benchmark_options, Mapping):
                raise ConfigError(
                    f"`benchmark_options` must be a dict of keyword arguments for benchmark_by_name or None, got "
                    f"{benchmark_options!r} (ContinualDataModule)."
                )
            if not isinstance(benchmark, str) and benchmark_options:
                raise ConfigError(
                    f"`benchmark_options` ({dict(benchmark_options)!r}) apply only to a benchmark given by name, but "
                    f"`benchmark` is a {type(benchmark).__name__} (ContinualDataModule). Pass the options to the "
                    "function that built it, or pass its name, e.g. ContinualDataModule('split_digits', "
                    "benchmark_options={'n_experiences': 5})."
                )
            bad = [k for k in benchmark_options if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"`benchmark_options` keys must be strings, got {bad!r} (ContinualDataModule).")

    # ------------------------------------------------------------------ the stream

    @property
    def n_experiences(self) -> int:
        """Number of training experiences."""
        return len(self._train_sets)

    @property
    def has_validation_stream(self) -> bool:
        """True when validation reads the benchmark's own ``valid_stream`` (one experience per training
        experience), False when it falls back to the test stream (see :meth:`experience_dataloaders`)."""
        return self._has_validation_stream

    @property
    def total_epochs(self) -> int:
        """Epochs of one ``fit`` over the whole stream: pass it as ``Trainer(max_epochs=...)``."""
        return self.n_experiences * self.epochs_per_experience

    @property
    def current_experience(self) -> int:
        """The experience being trained: the one :meth:`set_experience` fixed, or else the one the
        last :meth:`train_dataloader` served (0 before the first)."""
        return self._fixed if self._fixed is not None else self._current

    @property
    def fixed_experience(self) -> int | None:
        """The experience :meth:`set_experience` fixed, or None when the epoch chooses it."""
        return self._fixed

    def experience_for_epoch(self, epoch: int) -> int:
        """The experience that epoch ``epoch`` of one ``fit`` over the stream trains on.

        Raises:
            ConfigError: ``epoch`` is negative or past the end of the stream.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ConfigError(f"`epoch` must be an int >= 0, got {epoch!r}.")
        if epoch >= self.total_epochs:
            raise ConfigError(
                f"Epoch {epoch} is past the end of the stream: {self.n_experiences} experiences x "
                f"{self.epochs_per_experience} epochs_per_experience = {self.total_epochs} epochs "
                f"(0..{self.total_epochs - 1}). Pass `Trainer(max_epochs={self.total_epochs})`."
            )
        return int(epoch) // self.epochs_per_experience

    def set_experience(self, experience: int | None) -> None:
        """Serve ``experience`` from now on, whatever the epoch (one ``fit`` per experience).

        ``None`` goes back to choosing the experience from the epoch.

        Raises:
            ConfigError: ``experience`` is not an index of the stream.
        """
        if experience is not None:
            if (
                isinstance(experience, bool)
                or not isinstance(experience, numbers.Integral)
                or not 0 <= experience < self.n_experiences
            ):
                raise ConfigError(
                    f"`experience` must be an int in [0, {self.n_experiences - 1}] (the stream has "
                    f"{self.n_experiences} experiences) or None, got {experience!r}."
                )
            experience = int(experience)
            self._current = experience
        self._fixed = experience

    # ------------------------------------------------------------------ checks against the Trainer

    def _check_reload(self, trainer: Any) -> None:
        every = getattr(trainer, "reload_dataloaders_every_n_epochs", None)
        if self.n_experiences > 1 and every != 1:
            raise ConfigError(
                "ContinualDataModule switches experience every `epochs_per_experience` epochs in one `fit`, so "
                "the Trainer must rebuild the training dataloader every epoch: pass "
                f"`Trainer(reload_dataloaders_every_n_epochs=1, max_epochs={self.total_epochs})` "
                f"({self.n_experiences} experiences x {self.epochs_per_experience} epochs_per_experience); got "
                f"reload_dataloaders_every_n_epochs={every!r}. To run one `fit` per experience instead, call "
                "`datamodule.set_experience(i)` before each `fit`."
            )

    def _check_max_epochs(self, trainer: Any) -> None:
        max_epochs = trainer.max_epochs
        if trainer.max_steps != -1 or max_epochs is None:
            return
        total = self.total_epochs
        if max_epochs == -1 or max_epochs > total:
            raise ConfigError(
                f"`Trainer(max_epochs={max_epochs})` runs past the end of the stream: {self.n_experiences} "
                f"experiences x {self.epochs_per_experience} epochs_per_experience = {total} epochs. Pass "
                f"`Trainer(max_epochs={total})`."
            )
        if max_epochs < total:
            last = self.experience_for_epoch(max_epochs - 1) if max_epochs > 0 else -1
            rank_zero_warn(
                f"`Trainer(max_epochs={max_epochs})` stops before the end of the stream ({total} epochs): only "
                f"experiences 0..{last} of {self.n_experiences} will be trained. Pass `max_epochs={total}` to "
                "train them all."
            )

    def _epoch_to_train(self, trainer: Any) -> int:
        """The epoch whose data the Trainer is about to ask for.

        On resume from a checkpoint written at the end of an epoch, Lightning
        first asks for the training dataloader while ``current_epoch`` still
        holds the last completed epoch. The fit loop's ``processed`` epoch
        count already points at the epoch that will run next, and it is the
        value Lightning passes to ``sampler.set_epoch``, so it is read first.
        """
        progress = getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None)
        processed = getattr(getattr(progress, "current", None), "processed", None)
        if isinstance(processed, numbers.Integral):
            return int(processed)
        return int(trainer.current_epoch)

    def _fit_is_over(self, trainer: Any, epoch: int) -> bool:
        """True when the Trainer will stop before training ``epoch`` (e.g. resuming a finished run)."""
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs != -1 and epoch >= max_epochs:
            return True
        max_steps = trainer.max_steps
        return max_steps is not None and max_steps != -1 and trainer.global_step >= max_steps

    def _experience_to_train(self) -> int:
        if self._fixed is not None:
            return self._fixed
        trainer = self.trainer
        if trainer is None:
            return self._current
        self._check_reload(trainer)
        epoch = self._epoch_to_train(trainer)
        if epoch >= self.total_epochs and self._fit_is_over(trainer, epoch):
            # Lightning asks for a loader before it notices there is nothing left to train.
            return self.n_experiences - 1
        return self.experience_for_epoch(epoch)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if stage == "fit" and trainer is not None:
            self._adapt_dynamic_modules(trainer.lightning_module)
        if stage != "fit" or trainer is None or self._fixed is not None:
            return
        self._check_reload(trainer)
        self._check_max_epochs(trainer)

    def _adapt_dynamic_modules(self, module: Any) -> None:
        """Give Avalanche's dynamic modules (``MultiHeadClassifier``, ...) their parts for every training experience.

        Avalanche's strategies call ``avalanche_model_adaptation`` at each
        experience; Lightning never does, so a ``MultiHeadClassifier`` would have
        no head for task 1 (``KeyError: '1'``). Here every experience's parts
        are made once, in ``setup``, before Lightning builds the optimizer and
        before any merging callback takes θ₀, so the parameters never change
        during the stream.
        """
        if module is None:
            return
        from avalanche.models.dynamic_modules import DynamicModule, avalanche_model_adaptation

        if not any(isinstance(m, DynamicModule) for m in module.modules()):
            return
        for experience in _stream(self.benchmark, "train_stream"):
            avalanche_model_adaptation(module, experience)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _items(self, datasets: Sequence[Dataset], labels: Sequence[int], with_task_labels: bool) -> list[_Items]:
        return [_Items(d, with_task_labels, t) for d, t in zip(datasets, labels)]

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=getattr(dataset, "collate_fn", None),
        )

    def _joint_eval_loader(self, items: list[_Items]) -> DataLoader:
        """One loader over several experiences, in order (the "lightning" format's val and test loader)."""
        dataset: Dataset = items[0] if len(items) == 1 else ConcatDataset(items)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=items[0].collate_fn,
        )

    @property
    def _with_task_labels(self) -> bool:
        return self.batch_format == "avalanche"

    def train_sampler(self, experience: int) -> ResumableSampler:
        """The sampler of ``experience``'s training loader: this rank's shard, shuffled by ``(seed, epoch)``."""
        world_size, rank = self._world()
        return ResumableSampler(
            self._train_sets[experience], num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed
        )

    def _batches_done(self, loader: ResumableDataLoader) -> int | None:
        """Batches of the current epoch the Trainer has finished with ``loader``, or None when it is not training it.

        Lightning's ``processed`` count, not the batches drawn: a checkpoint
        written because a step raised (``save_on_exception``) must not count
        that step's batch, which Lightning runs again on resume.
        """
        trainer = self.trainer
        if trainer is None or getattr(trainer, "train_dataloader", None) is not loader:
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        """The loader of the experience to train now (see :attr:`current_experience`).

        A :class:`ResumableDataLoader`: a checkpoint written in the middle of
        an epoch resumes with exactly the batches the uninterrupted run saw.
        """
        experience = self._experience_to_train()
        self._current = experience
        dataset = _Items(self._train_sets[experience], self._with_task_labels, self._train_labels[experience])
        loader = ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.train_sampler(experience),
            batches_done=self._batches_done,
            experience=experience,
            num_workers=self.num_workers,
            collate_fn=dataset.collate_fn,
        )
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "fit_loop", None) is not None:
            # On resume Lightning creates the first iterator before it calls `set_epoch`; with workers,
            # that iterator draws its order at once, so the epoch must be right from the start.
            loader.sampler.set_epoch(self._epoch_to_train(trainer))
        return loader

    def experience_train_dataloader(self, experience: int, epoch: int | None = None) -> DataLoader:
        """The training loader ``experience`` had in epoch ``epoch``: its data, this rank's shard, that epoch's order.

        What a callback that needs an experience's own training data after the
        Trainer has moved on reads (``ModelMerging("fisher")`` estimates the
        experience's Fisher from it at the boundary, which one ``fit`` over the
        stream reaches after the next experience's loader is built). A plain
        loader that shares nothing with the Trainer's: iterating it changes no
        training state, and it gives the same batches in a resumed run.

        Args:
            experience: an index of the training stream.
            epoch: the epoch whose order to give; default the experience's last
                epoch in one ``fit`` over the stream,
                ``(experience + 1) * epochs_per_experience - 1``.

        Raises:
            ConfigError: ``experience`` is not an index of the stream, or
                ``epoch`` is not an int >= 0.
        """
        if isinstance(experience, bool) or not isinstance(experience, numbers.Integral) or not 0 <= experience < self.n_experiences:
            raise ConfigError(
                f"`experience` must be an int in [0, {self.n_experiences - 1}], got {experience!r} "
                "(ContinualDataModule.experience_train_dataloader)."
            )
        if epoch is None:
            epoch = (int(experience) + 1) * self.epochs_per_experience - 1
        elif isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ConfigError(
                f"`epoch` must be an int >= 0 or None, got {epoch!r} (ContinualDataModule.experience_train_dataloader)."
            )
        dataset = _Items(self._train_sets[experience], self._with_task_labels, self._train_labels[experience])
        sampler = self.train_sampler(int(experience))
        sampler.set_epoch(int(epoch))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=dataset.collate_fn,
        )

    def _evaluated_val_experiences(self) -> int:
        """How many experiences of the validation stream :meth:`val_dataloader` serves."""
        n = len(self._val_sets)
        if self.eval_on == "seen" and n == self.n_experiences:
            return self.current_experience + 1
        return n

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The evaluated experiences (``eval_on``) of the validation stream, in order.

        ``"lightning"`` format: one loader over all of them, batches ``x, y``.
        ``"avalanche"`` format: one loader per experience (loader ``k`` is
        experience ``k``), batches ``x, y, task_label``.
        """
        n = self._evaluated_val_experiences()
        items = self._items(self._val_sets[:n], self._val_labels[:n], self._with_task_labels)
        if self.batch_format == "lightning":
            return self._joint_eval_loader(items)
        return [self._eval_loader(d) for d in items]

    @override
    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """Every test experience, in order.

        ``"lightning"`` format: one loader over all of them, batches ``x, y``.
        ``"avalanche"`` format: one loader per experience, batches ``x, y, task_label``.
        """
        items = self._items(self._test_sets, self._test_labels, self._with_task_labels)
        if self.batch_format == "lightning":
            return self._joint_eval_loader(items)
        return [self._eval_loader(d) for d in items]

    def experience_dataloaders(self, split: str = "test", with_task_labels: bool | None = None) -> list[DataLoader]:
        """One unshuffled loader per experience of a stream, in order: loader ``k`` is experience ``k``.

        Every experience of the stream, whatever ``eval_on`` and the experience
        being trained: what an accuracy matrix needs.

        Args:
            split: ``"test"`` (default): the test stream; ``"val"``: the
                validation stream (the benchmark's ``valid_stream`` when it has
                one experience per training experience, else the test stream).
            with_task_labels: None (default): batches in this datamodule's
                ``batch_format``; True: ``x, y, task_label`` whatever the
                format; False: ``x, y``.

        Raises:
            ConfigError: an unknown ``split``, or a ``with_task_labels`` that is
                not None, True or False.
        """
        if split not in _SPLITS:
            raise ConfigError(
                f"`split` must be one of {list(_SPLITS)}, got {split!r} (ContinualDataModule.experience_dataloaders)."
                + did_you_mean(str(split), _SPLITS)
            )
        if with_task_labels is not None and not isinstance(with_task_labels, bool):
            raise ConfigError(
                f"`with_task_labels` must be None, True or False, got {with_task_labels!r} "
                "(ContinualDataModule.experience_dataloaders)."
            )
        labels = self._with_task_labels if with_task_labels is None else with_task_labels
        if split == "test":
            items = self._items(self._test_sets, self._test_labels, labels)
        else:
            items = self._items(self._val_sets, self._val_labels, labels)
        return [self._eval_loader(d) for d in items]
