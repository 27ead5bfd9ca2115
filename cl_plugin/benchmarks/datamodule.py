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

Order and resume. The training loader samples with
``torch.utils.data.DistributedSampler(shuffle=True, seed=seed)``, whose order
is a pure function of ``(seed, epoch)``; Lightning calls ``set_epoch`` before
every epoch, so a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would (a DataLoader with a seeded ``generator`` does not:
each new iterator draws from it). Under DDP the sampler takes
``num_replicas``/``rank`` from the Trainer, so each rank trains on its own
shard; Lightning leaves a ``DistributedSampler`` in place whatever
``use_distributed_sampler`` says. The evaluation loaders are plain,
unshuffled loaders; under DDP Lightning gives them its own distributed
sampler (``use_distributed_sampler=True``, the default), which pads the last
shard with a few repeated examples.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from cl_plugin.errors import ConfigError

__all__ = ["ContinualDataModule"]

_EVAL_ON = ("seen", "all")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"`{name}` must be an int, got {value!r} (ContinualDataModule).")
    if value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}, got {value!r} (ContinualDataModule).")


def _stream_datasets(benchmark: Any, stream_name: str) -> list[Dataset]:
    stream = getattr(benchmark, stream_name, None)
    if stream is None:
        raise ConfigError(
            f"`benchmark` has no `{stream_name}` (got {type(benchmark).__name__}). ContinualDataModule takes an "
            "Avalanche benchmark, e.g. `split_digits()` or `avalanche.benchmarks.SplitMNIST(...)`."
        )
    return [experience.dataset for experience in stream]


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


class ContinualDataModule(LightningDataModule):
    """Serve an Avalanche benchmark to a Lightning Trainer, experience by experience.

    Batches are ``(x, y, task_label)``, as Avalanche's datasets yield them.

    Args:
        benchmark: any Avalanche 0.6 benchmark with a ``train_stream`` and a
            ``test_stream`` (class-, domain- or task-incremental), e.g.
            :func:`~cl_plugin.benchmarks.split_digits`.
        batch_size: batch size of every loader (default 32).
        epochs_per_experience: epochs spent on each experience in one ``fit``
            over the stream (default 1).
        num_workers: DataLoader workers (default 0).
        eval_on: ``"seen"`` (default): :meth:`val_dataloader` returns the
            experiences trained so far, ``0..current_experience``; ``"all"``:
            every experience. Validation uses the benchmark's ``valid_stream``
            when it has one with one experience per training experience, and
            the ``test_stream`` otherwise. When the evaluation stream has a
            different number of experiences (CORe50's single test set), all of
            it is served.
        seed: seed of the training sampler; the order of an epoch is a pure
            function of ``(seed, epoch)``.

    Attributes:
        benchmark: the benchmark given (None in a copy unpickled in another
            process: Avalanche's scenarios do not pickle, so only their
            experience datasets travel).
        epochs_per_experience, batch_size, num_workers, eval_on, seed: as given.
        classes_in_experience: per training experience, its sorted classes.

    Raises:
        ConfigError: a bad argument, a benchmark without ``train_stream`` or
            ``test_stream``, or an empty stream; at ``fit``, a Trainer that does
            not reload dataloaders every epoch or that would run past the end
            of the stream (the message says what to pass to ``Trainer``).

    Example:
        >>> from cl_plugin.benchmarks import split_digits
        >>> dm = ContinualDataModule(split_digits(n_experiences=5), epochs_per_experience=2)
        >>> dm.n_experiences, dm.total_epochs, dm.experience_for_epoch(5)
        (5, 10, 2)
        >>> x, y, t = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), sorted(set(y.tolist())) == dm.classes_in_experience[0]
        ((32, 1, 8, 8), True)
    """

    def __init__(
        self,
        benchmark: Any,
        batch_size: int = 32,
        epochs_per_experience: int = 1,
        num_workers: int = 0,
        eval_on: str = "seen",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._validate_init(batch_size, epochs_per_experience, num_workers, eval_on, seed)
        train_sets = _stream_datasets(benchmark, "train_stream")
        test_sets = _stream_datasets(benchmark, "test_stream")
        if not train_sets or not test_sets:
            raise ConfigError(
                f"The benchmark's stream is empty: {len(train_sets)} training and {len(test_sets)} test "
                "experiences. Build it with at least one experience."
            )
        valid_stream = getattr(benchmark, "valid_stream", None)
        val_sets = [e.dataset for e in valid_stream] if valid_stream is not None else []
        if len(val_sets) != len(train_sets):
            val_sets = test_sets

        self.benchmark = benchmark
        self.batch_size = int(batch_size)
        self.epochs_per_experience = int(epochs_per_experience)
        self.num_workers = int(num_workers)
        self.eval_on = eval_on
        self.seed = int(seed)
        self.classes_in_experience: list[list[int]] = [_classes_of(e) for e in benchmark.train_stream]
        self._train_sets = train_sets
        self._test_sets = test_sets
        self._val_sets = val_sets
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
    def _validate_init(batch_size, epochs_per_experience, num_workers, eval_on, seed) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("epochs_per_experience", epochs_per_experience, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        if eval_on not in _EVAL_ON:
            raise ConfigError(f"`eval_on` must be one of {list(_EVAL_ON)}, got {eval_on!r} (ContinualDataModule).")

    # ------------------------------------------------------------------ the stream

    @property
    def n_experiences(self) -> int:
        """Number of training experiences."""
        return len(self._train_sets)

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
        if stage != "fit" or trainer is None or self._fixed is not None:
            return
        self._check_reload(trainer)
        self._check_max_epochs(trainer)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=getattr(dataset, "collate_fn", None),
        )

    def train_sampler(self, experience: int) -> DistributedSampler:
        """The sampler of ``experience``'s training loader: this rank's shard, shuffled by ``(seed, epoch)``."""
        world_size, rank = self._world()
        return DistributedSampler(
            self._train_sets[experience], num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """The loader of the experience to train now (see :attr:`current_experience`)."""
        experience = self._experience_to_train()
        self._current = experience
        dataset = self._train_sets[experience]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.train_sampler(experience),
            num_workers=self.num_workers,
            collate_fn=getattr(dataset, "collate_fn", None),
        )

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One loader per evaluated experience, in order: loader ``k`` is experience ``k``."""
        sets: Sequence[Dataset] = self._val_sets
        if self.eval_on == "seen" and len(sets) == self.n_experiences:
            sets = sets[: self.current_experience + 1]
        return [self._eval_loader(d) for d in sets]

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test experience, in order."""
        return [self._eval_loader(d) for d in self._test_sets]
