"""``ContinualEvaluation``: the accuracy matrix of the training weights and of merged weights.

After every experience the callback evaluates on every test experience and
fills one :class:`~cl_plugin.metrics.AccuracyMatrix` per evaluated model:

* the training weights (``sequential_finetuning`` when the run fine-tunes
  sequentially);
* θ₀ + scale·merged for each method in ``compare`` and for a
  :class:`~cl_plugin.callbacks.ModelMerging` callback's own method. All
  methods fold the same task vectors (through the same boundary core,
  :class:`~cl_plugin.merging.continual.ContinualMerge`), so one fine-tuning
  run gives every method's matrix.

Before the first experience it also evaluates θ₀ once, so forward transfer is
in the results.

A method's λ may be chosen on validation data at every boundary
(``scales={"magmax": "validate"}``, or the ``ModelMerging`` callback's
``scale="validate"``): the choice and the grid's validation accuracies are in
``results[method]["scale"]`` and ``["scale_validation"]``. ``"fisher"``
folds each experience's diagonal Fisher, estimated from its own training data
(the ``ModelMerging("fisher")`` callback's, when there is one).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from cl_plugin._checkpoint import check_tensor_dict, read
from cl_plugin._checks import check_bool, check_scale
from cl_plugin._io import atomic_output
from cl_plugin.errors import CheckpointError, ConfigError, did_you_mean
from cl_plugin.merging import MERGERS, get_merger
from cl_plugin.merging.continual import ContinualMerge, is_dtensor
from cl_plugin.metrics import AccuracyMatrix
from cl_plugin.metrics.task_aware import mask_to_classes
from cl_plugin.callbacks._boundaries import TaskBoundaryCallback, merge_shard
from cl_plugin.callbacks._boundary_data import (
    DEFAULT_FISHER_BATCHES,
    check_fisher_loss_source,
    check_scale_grid,
    choose_scale,
    default_predict,
    default_target,
    evaluation_views,
    experience_fisher,
    refuse_fisher_on_dtensors,
    scale_grid_for,
    shard_loader,
    validation_loaders,
)
from cl_plugin.callbacks.model_merging import VALIDATE, ModelMerging

__all__ = ["ContinualEvaluation", "default_predict", "default_target", "training_weights_name"]

_TRAINING_NAMES = {
    "finetuned": "sequential_finetuning",
    "pretrained": "independent_finetuning",
    "merged": "finetuning_from_merged",
}


def training_weights_name(start_from: str | None) -> str:
    """The results key of the training weights for a run whose experiences start from ``start_from``."""
    return _TRAINING_NAMES.get(start_from or "finetuned", "sequential_finetuning")


class ContinualEvaluation(TaskBoundaryCallback):
    """Fill an accuracy matrix per model after every experience; log and save the figures.

    Place it anywhere in ``callbacks=[...]``: at setup it moves itself before
    any ``ModelMerging`` so it sees the training weights before they are
    replaced.

    Args:
        compare: merging methods to evaluate besides the training weights,
            e.g. ``["magmax", "average", "random", "ties", "opcm",
            "task_arithmetic"]``; each folds the same task vectors.
        scales: per-method scale, e.g. ``{"magmax": 0.5}``, or ``"validate"``
            to choose that method's λ at every boundary by accuracy on the
            validation loaders of the experiences seen so far (as
            ``ModelMerging(scale="validate")``; the datamodule needs a
            validation stream); the string ``"validate"`` alone validates every
            method. Default: each method's default (or the ``ModelMerging``
            callback's scale, validated when it is).
        scale_grid: the λ tried for a validated method, one list for every
            method or a mapping of method to list (default: the method's
            default λ times 0.2, 0.4, ..., 2.0; the ``ModelMerging`` callback's
            grid for its own method).
        method_options: per-method options, e.g. ``{"ties": {"top_k": 0.2}}``.
        output_dir: if given, rank 0 writes ``results.json`` and one heatmap
            ``accuracy_matrix_<name>.png`` per model there when ``fit`` ends.
        predict: ``predict(pl_module, batch) -> logits (N, C)`` (or ``(N,)`` /
            ``(N, 1)`` single logits of a binary head, thresholded at 0);
            default :func:`default_predict`. A plain function, so a
            LightningCLI YAML file can name it by import path.
        target: ``target(batch) -> (N,)`` class indices; default
            :func:`default_target` (``batch[1]``, or a mapping's ``labels``).
        loaders: the test loaders, one per test experience (a list, or a
            function ``loaders(trainer) -> list``); default: the datamodule's
            ``experience_dataloaders("test")`` when it has one
            (:class:`~cl_plugin.benchmarks.ContinualDataModule`; with task
            labels, ``(x, y, t)``, when ``predict`` is an adapter callback's
            ``predict``, which selects the adapter by label), else its
            ``test_dataloader()``, which must then return one loader per
            experience. Batches go through the datamodule's and the module's
            batch-transfer hooks, as in ``trainer.test``.
        task_aware: evaluate each test experience with the logits of classes
            outside it masked (task-incremental accuracy; default False:
            class-incremental). Needs the classes of each experience from the
            datamodule (``classes_in_experience``) or its Avalanche benchmark.
        exclude: glob patterns not merged (default: the ``ModelMerging``
            callback's, else none).
        evaluate_training_weights: also evaluate the training weights (default True).
        evaluate_initial: evaluate θ₀ once before the first experience, for
            forward transfer (default True).

    ``"fisher"`` (in ``compare`` or as the ``ModelMerging`` method) folds
    each experience's diagonal Fisher: the ``ModelMerging("fisher")``
    callback's estimate when there is one, else one made the same way with
    its defaults (8 batches of the experience's training loader, the loss of
    ``training_step``).

    Raises:
        ConfigError: unknown method, scale out of range, options of a method
            not in ``compare``; at ``setup``, a second ``ContinualEvaluation``
            in the Trainer, a strategy that spawns its processes, no test
            loaders, or ``task_aware`` without known classes; when resuming, a
            checkpoint written with other ``compare``, ``scales``,
            ``method_options``, ``exclude``, ``evaluate_training_weights`` or
            ``task_aware`` (the matrices would mix two settings).
        CheckpointError: a damaged checkpoint state or one that does not fit
            the model or the stream.

    Attributes:
        matrices: name -> :class:`~cl_plugin.metrics.AccuracyMatrix` (rows:
            trained experiences; columns: test experiences).
        results: name -> dict with ``average_accuracy``, ``forgetting``,
            ``bwt``, ``fwt``, ``accuracy_matrix`` and ``initial_accuracies``
            (the ``results.json`` schema); for a method whose λ is chosen on
            validation data also ``scale`` (the λ of each row) and
            ``scale_validation`` (per row, λ -> mean validation accuracy over
            the experiences seen, keys written ``f"{λ:g}"``). A figure that
            does not apply to the stream (forgetting on a stream whose test
            experiences are not its training experiences) is NaN.
    """

    _state_name = "ContinualEvaluation"

    def __init__(
        self,
        compare: Iterable[str] = (),
        scales: Mapping[str, float | str] | str | None = None,
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        output_dir: str | os.PathLike | None = None,
        predict: Callable[[LightningModule, Any], Tensor] | None = None,
        exclude: Iterable[str] | None = None,
        evaluate_training_weights: bool = True,
        target: Callable[[Any], Tensor] | None = None,
        loaders: Sequence[DataLoader] | Callable[[Trainer], Sequence[DataLoader]] | None = None,
        task_aware: bool = False,
        evaluate_initial: bool = True,
        scale_grid: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(compare, str):
            compare = (compare,)
        self.compare = list(dict.fromkeys(compare))
        for name in self.compare:
            if name not in MERGERS:
                raise ConfigError(
                    f"Unknown merging method {name!r} in `compare` (ContinualEvaluation). "
                    f"Choose from {sorted(MERGERS)}.{did_you_mean(str(name), MERGERS)}"
                )
        self.scales: dict[str, float | str] = {}
        if isinstance(scales, str):
            if scales != VALIDATE:
                raise ConfigError(
                    f"`scales` must be a mapping of method to scale, or {VALIDATE!r} (every method's λ chosen on "
                    f"validation data), got {scales!r} (ContinualEvaluation).{did_you_mean(scales, (VALIDATE,))}"
                )
            scales = {name: VALIDATE for name in self.compare}
        for name, value in dict(scales or {}).items():
            if name not in MERGERS:
                raise ConfigError(f"`scales` names an unknown method {name!r}; choose from {sorted(MERGERS)}.")
            if isinstance(value, str):
                if value != VALIDATE:
                    raise ConfigError(
                        f"`scales[{name!r}]` must be a number in (0, 10] or {VALIDATE!r}, got {value!r} "
                        f"(ContinualEvaluation).{did_you_mean(value, (VALIDATE,))}"
                    )
                self.scales[name] = VALIDATE
            else:
                self.scales[name] = check_scale(value, f"ContinualEvaluation scales[{name!r}]")
        if isinstance(scale_grid, Mapping):
            unknown = [name for name in scale_grid if name not in MERGERS]
            if unknown:
                raise ConfigError(f"`scale_grid` names unknown methods {unknown}; choose from {sorted(MERGERS)}.")
            self.scale_grid: tuple[float, ...] | dict[str, tuple[float, ...]] | None = {
                name: check_scale_grid(grid, f"ContinualEvaluation scale_grid[{name!r}]") for name, grid in scale_grid.items()
            }
        else:
            self.scale_grid = check_scale_grid(scale_grid, "ContinualEvaluation")
        self.method_options = {k: dict(v) for k, v in dict(method_options or {}).items()}
        for name, options in self.method_options.items():
            if name not in self.compare:
                raise ConfigError(
                    f"`method_options` has options for {name!r}, which is not in `compare` {self.compare}."
                )
            get_merger(name, **options)  # validates the options now
        for what, fn in (("predict", predict), ("target", target)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"`{what}` must be a function, got {fn!r} (ContinualEvaluation).")
        if loaders is not None and not callable(loaders) and not isinstance(loaders, Sequence):
            raise ConfigError(
                f"`loaders` must be a list of DataLoaders (one per test experience) or a function returning one, "
                f"got {type(loaders).__name__} (ContinualEvaluation)."
            )
        self.predict = predict or default_predict
        self.target = target or default_target
        self.loaders = loaders
        self.output_dir = None if output_dir is None else Path(output_dir)
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.exclude = None if exclude is None else tuple(exclude)
        self.evaluate_training_weights = check_bool(evaluate_training_weights, "evaluate_training_weights", "ContinualEvaluation")
        self.task_aware = check_bool(task_aware, "task_aware", "ContinualEvaluation")
        self.evaluate_initial = check_bool(evaluate_initial, "evaluate_initial", "ContinualEvaluation")
        self.matrices: dict[str, AccuracyMatrix] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self._cores: dict[str, ContinualMerge] = {}
        self._merging: ModelMerging | None = None
        self._theta0: dict[str, Tensor] | None = None
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._classes: list[list[int]] | None = None
        self._training_name = "sequential_finetuning"
        #: method -> one record per boundary: {"experience", "scale", and for a validated method "grid", "validation_accuracy"}.
        self._scale_log: dict[str, list[dict[str, Any]]] = {}
        self._validation_views: list[Any] | None = None  # the validation batches of the current boundary

    def _options(self) -> dict[str, Any]:
        return {
            "compare": list(self.compare),
            "scales": dict(self.scales),
            "method_options": {k: dict(v) for k, v in self.method_options.items()},
            "exclude": None if self.exclude is None else list(self.exclude),
            "evaluate_training_weights": self.evaluate_training_weights,
            "task_aware": self.task_aware,
            "scale_grid": (
                None
                if self.scale_grid is None
                else {k: list(v) for k, v in self.scale_grid.items()}
                if isinstance(self.scale_grid, dict)
                else list(self.scale_grid)
            ),
        }

    def _second_instance_message(self, same) -> str:
        return (
            f"The Trainer has {len(same)} ContinualEvaluation callbacks; use one. It evaluates the training weights "
            "and every method in `compare` from the same run, e.g. ContinualEvaluation(compare=['magmax', 'ties'])."
        )

    @property
    def _mergers(self) -> dict[str, Any]:
        """Method name -> its streaming merger."""
        return {name: core.merger for name, core in self._cores.items()}

    #: ModelMerging keeps an even split over the ranks when this callback is beside it:
    #: the compared methods share its θ₀ slices (and one task vector, for those that cannot stream).
    shares_model_merging_theta0 = True

    # -- setup ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        merging = [cb for cb in trainer.callbacks if isinstance(cb, ModelMerging)]
        self._merging = merging[0] if merging else None
        if self._merging is not None:
            callbacks = trainer.callbacks
            if callbacks.index(self) > callbacks.index(self._merging):
                # Evaluate the training weights before ModelMerging replaces them.
                callbacks.remove(self)
                callbacks.insert(callbacks.index(self._merging), self)
            self._training_name = training_weights_name(self._merging.start_from)
        exclude = self.exclude if self.exclude is not None else (self._merging.exclude if self._merging else ())
        statistics = self._merging.statistics if self._merging is not None else "average"
        loaders = self._test_loaders(trainer)
        n_test = len(loaders)
        n_trained = getattr(getattr(trainer, "datamodule", None), "n_experiences", None) or n_test
        if self.task_aware and self._classes is None:
            self._classes = self._experience_classes(trainer, n_test)
        methods = list(self.compare)
        if self._merging is not None and self._merging.method not in methods:
            methods.insert(0, self._merging.method)
        for name in methods:
            if name not in self._cores:
                options = self.method_options.get(name)
                if options is None and self._merging is not None and self._merging.method == name:
                    options = self._merging.method_options
                # One layout for every compared method: they share θ₀'s slices (and one τ, where they cannot stream).
                self._cores[name] = ContinualMerge(
                    name,
                    scale=self._scale(name),
                    exclude=exclude,
                    statistics=statistics,
                    method_options=options,
                    whole_matrices=False,
                )
        for core in self._cores.values():
            core.bind(pl_module, shard=merge_shard(trainer))
        if any(self._validated(name) for name in self._cores):
            validation_loaders(trainer, "ContinualEvaluation")  # refuse now, not after the first experience
        if any(core.merger.requires_fisher for core in self._cores.values()):
            merging_fisher = self._merging is not None and self._merging.fisher_loss is not None
            check_fisher_loss_source(pl_module, self._merging.fisher_loss if merging_fisher else None, "ContinualEvaluation('fisher')")
        state = pl_module.state_dict()
        self._layout = {n: (tuple(state[n].shape), state[n].dtype) for n in self._tensor_names()}
        names = ([self._training_name] if self.evaluate_training_weights else []) + methods
        for name in names:
            if name not in self.matrices:
                self.matrices[name] = AccuracyMatrix(n_trained, n_test)

    def _tensor_names(self) -> list[str]:
        core = next(iter(self._cores.values()), None)
        return core.all_names if core is not None else []

    def _scale(self, method: str) -> float | None:
        """The fixed λ of ``method`` (None: its default, or chosen on validation data)."""
        if method in self.scales:
            value = self.scales[method]
            return None if value == VALIDATE else value
        if self._merging is not None and self._merging.method == method:
            return None if self._merging.validate_scale else self._merging.scale
        return None

    def _validated(self, method: str) -> bool:
        """True when ``method``'s λ is chosen on validation data at every boundary."""
        if method in self.scales:
            return self.scales[method] == VALIDATE
        return self._merging is not None and self._merging.method == method and self._merging.validate_scale

    def _grid(self, method: str) -> tuple[float, ...]:
        grid = self.scale_grid.get(method) if isinstance(self.scale_grid, dict) else self.scale_grid
        if grid is None and self._merging is not None and self._merging.method == method and self._merging.validate_scale:
            return tuple(self._merging.scale_grid)
        return scale_grid_for(MERGERS[method].default_scale, grid)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if any(is_dtensor(p) for p in pl_module.parameters()):  # FSDP2 shards in configure_model, after setup
            if any(core.merger.requires_fisher for core in self._cores.values()):
                refuse_fisher_on_dtensors(pl_module, "ContinualEvaluation")
            for core in self._cores.values():
                core.bind(pl_module, shard=merge_shard(trainer))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._cores and self._theta0 is None and not self._shares_theta0():
            # Its own θ₀ only when the ModelMerging callback (which takes θ₀ in this same
            # hook, after this one) does not merge every tensor compared here.
            self._theta0 = next(iter(self._cores.values())).snapshot(pl_module)
        pending = [m for m in self.matrices.values() if bool(torch.isnan(m.initial_accuracies()).all())]
        if self.evaluate_initial and pending and not self._experiences_finished and self._training_experience is None:
            self._evaluate(trainer, pl_module, pending, row=None)  # θ₀, once: forward transfer needs it

    def _shares_theta0(self) -> bool:
        """True when the ModelMerging callback merges every tensor compared here (its θ₀ serves both)."""
        merging = self._merging
        if merging is None or merging.core.names is None or not set(self._tensor_names()) <= set(merging.core.all_names):
            return False
        # Shared slices need one layout: ModelMerging splits evenly beside this callback
        # (`shares_model_merging_theta0`), as these cores do. A mismatch would slice θ₀ wrongly.
        ours, theirs = next(iter(self._cores.values())).layout, merging.core.layout
        if (ours is None) != (theirs is None) or (
            ours is not None and any(ours[n] != theirs[n] for n in self._tensor_names())
        ):
            raise ConfigError(
                "ContinualEvaluation and ModelMerging split the model's tensors differently over the ranks, so they "
                "cannot share θ₀. This is a bug in cl-plugin: please report it, with the strategy and methods used."
            )
        return True

    def _base(self) -> dict[str, Tensor] | None:
        """θ₀ over the compared tensors: the ModelMerging callback's when it holds them all, else this callback's."""
        if self._shares_theta0() and self._merging.base_weights is not None:
            return {n: self._merging.base_weights[n] for n in self._tensor_names()}
        return self._theta0

    # -- evaluation ----------------------------------------------------------------------------
    def _test_loaders(self, trainer: Trainer) -> list[DataLoader]:
        if self.loaders is not None:
            loaders = self.loaders(trainer) if callable(self.loaders) else self.loaders
            return list(loaders)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "experience_dataloaders"):
            # An adapter callback's predict (per-task LoRA, Share) selects by the batch's task label.
            needs_labels = hasattr(getattr(self.predict, "__self__", None), "forward_by_task")
            return list(datamodule.experience_dataloaders("test", with_task_labels=True if needs_labels else None))
        loaders = datamodule.test_dataloader() if datamodule is not None and hasattr(datamodule, "test_dataloader") else None
        if isinstance(loaders, Sequence) and loaders:
            return list(loaders)
        raise ConfigError(
            "ContinualEvaluation needs one test loader per experience: pass `loaders=[...]` (or a function "
            "returning them), or use a datamodule with `experience_dataloaders('test')` such as "
            "cl_plugin.benchmarks.ContinualDataModule"
            + (" (this datamodule's test_dataloader() returns a single loader)." if loaders is not None else ".")
        )

    def _experience_classes(self, trainer: Trainer, n_test: int) -> list[list[int]]:
        datamodule = getattr(trainer, "datamodule", None)
        classes = getattr(datamodule, "classes_in_experience", None)
        if classes is None:
            benchmark = getattr(datamodule, "benchmark", None)
            stream = getattr(benchmark, "test_stream", None)
            if stream is not None:
                classes = [list(e.classes_in_this_experience) for e in stream]
        if classes is None or len(classes) != n_test:
            raise ConfigError(
                "ContinualEvaluation(task_aware=True) masks the logits to each test experience's classes, but the "
                "datamodule tells no classes per experience (`classes_in_experience`, or an Avalanche benchmark's "
                "test_stream). Use cl_plugin.benchmarks.ContinualDataModule, or evaluate class-incrementally."
            )
        return [sorted(int(c) for c in cs) for cs in classes]

    @torch.no_grad()
    def _evaluate(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        matrices: Sequence[AccuracyMatrix],
        row: int | None,
        views: Sequence[Any] | None = None,
    ) -> None:
        """Count the module's predictions on every test experience into ``matrices`` (row None: θ₀'s accuracies).

        ``views``: the test loaders already sharded and replayable (one boundary evaluates several models).
        """
        was_training = pl_module.training
        pl_module.eval()
        if views is None:
            views = [shard_loader(loader, trainer) for loader in self._test_loaders(trainer)]
        try:
            for j, loader in enumerate(views):
                for batch in loader:
                    # Through the datamodule's and the module's batch-transfer hooks, as Lightning's loops do.
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=j)
                    logits = self.predict(pl_module, batch)
                    if self.task_aware:
                        logits = mask_to_classes(logits, self._classes[j])
                    logits, targets = logits.detach().cpu(), self.target(batch).detach().cpu()
                    for matrix in matrices:
                        if row is None:
                            matrix.update_initial(logits, targets, j)
                        else:
                            matrix.update(logits, targets, row, j)
        finally:
            pl_module.train(was_training)

    def on_experience_diverged(
        self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool
    ) -> None:
        # Evaluate nothing for it. A callback after this one that restores the weights
        # (ModelMerging, the adapter callbacks) raises with what it did; otherwise raise here.
        later = trainer.callbacks[trainer.callbacks.index(self) + 1 :]
        if not any(isinstance(cb, TaskBoundaryCallback) for cb in later):
            super().on_experience_diverged(trainer, pl_module, experience, at_fit_end)

    def on_experience_end(
        self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool
    ) -> None:
        row = experience
        # The test batches are read once and replayed for every model of this boundary; the
        # validation batches once for every method and λ.
        tests = evaluation_views(self._test_loaders(trainer), trainer)
        self._validation_views = None
        if self.evaluate_training_weights:
            self._evaluate(trainer, pl_module, [self.matrices[self._training_name]], row, tests)
        if self._cores:
            base = self._base()
            for core in self._cores.values():
                core.theta0 = base
            cores = list(self._cores.items())
            first = cores[0][1]
            fishers = {
                name: self._fisher(trainer, pl_module, core, experience, at_fit_end)
                for name, core in cores
                if core.merger.requires_fisher
            }
            # Every method folds before any writes its merge into the module. The methods that
            # can form τ chunk by chunk read it from the weights (no buffer the size of τ); the
            # others share one τ, formed only when one of them is compared.
            whole = [core for _, core in cores if not core.folds_in_place]
            task_vector = whole[0].task_vector(pl_module, trusted=True) if whole else None  # never handed out
            for name, core in cores:
                if core.folds_in_place:
                    core.fold_in_place(pl_module)
                else:
                    core.fold(task_vector, fisher=fishers.pop(name, None))
            del task_vector
            current = first.snapshot(pl_module)
            try:
                for name, core in cores:
                    record: dict[str, Any] = {"experience": experience}
                    if self._validated(name):
                        record.update(self._choose_scale(trainer, pl_module, name, core, experience))
                    record["scale"] = core.scale
                    self._scale_log.setdefault(name, []).append(record)
                    core.write(pl_module, core.merged_tensors())
                    self._evaluate(trainer, pl_module, [self.matrices[name]], row, tests)
            finally:
                first.write(pl_module, current)
                self._validation_views = None
        self._summarise(trainer, row)
        if at_fit_end:
            self._save(trainer)

    def _fisher(
        self, trainer: Trainer, pl_module: LightningModule, core: ContinualMerge, experience: int, at_fit_end: bool
    ) -> dict[str, Tensor]:
        """The experience's Fisher for ``core``: the ModelMerging callback's when it estimates one over these tensors."""
        merging = self._merging
        if merging is not None and merging.fisher_batches is not None and set(core.names) <= set(merging.core.names):
            return merging.experience_fisher(trainer, pl_module, experience, at_fit_end)
        return experience_fisher(trainer, pl_module, core, experience, at_fit_end, n_batches=DEFAULT_FISHER_BATCHES)

    def _choose_scale(
        self, trainer: Trainer, pl_module: LightningModule, name: str, core: ContinualMerge, experience: int
    ) -> dict[str, Any]:
        """Set ``core``'s λ to the grid's best on the validation data of experiences 0..``experience``."""
        loaders = validation_loaders(trainer, "ContinualEvaluation")
        if len(loaders) <= experience:
            raise ConfigError(
                f"ContinualEvaluation: experience {experience} has no validation loader (the datamodule gives "
                f"{len(loaders)}); the validation stream needs one experience per training experience."
            )
        grid = self._grid(name)
        classes = self._classes[: experience + 1] if self.task_aware else None
        if self._validation_views is None:
            self._validation_views = evaluation_views(loaders[: experience + 1], trainer)
        value, scores = choose_scale(
            core, trainer, pl_module, self._validation_views, grid, self.predict, self.target, classes
        )
        core.scale = value
        return {"grid": list(grid), "validation_accuracy": scores}

    @contextlib.contextmanager
    def merged_weights(
        self, pl_module: LightningModule, method: str, scale: float | None = None
    ) -> Iterator[LightningModule]:
        """Inside the block the module holds θ₀ + λ·merged of ``method`` (λ: ``scale``, default the method's current one).

        The weights before the block come back after it. Every rank must enter
        it under a sharded strategy. E.g. the test accuracy of every λ of a
        grid after the stream (the best λ in hindsight, for reporting)::

            with evaluation.merged_weights(model, "magmax", scale=0.3):
                trainer.test(model, datamodule=dm)

        Raises:
            ConfigError: ``method`` is not evaluated here, or nothing is folded yet.
        """
        core = self._cores.get(method)
        if core is None:
            raise ConfigError(
                f"ContinualEvaluation evaluates no method {method!r}; it evaluates {sorted(self._cores)}."
                + did_you_mean(str(method), self._cores)
            )
        if scale is not None:
            scale = check_scale(scale, "ContinualEvaluation.merged_weights")
        core.theta0 = self._base()
        merged = core.merged_tensors(scale)  # as the matrices are evaluated
        saved = core.snapshot(pl_module)
        core.write(pl_module, merged)
        del merged
        try:
            yield pl_module
        finally:
            core.write(pl_module, saved)

    def _update_results(self) -> None:
        for name, matrix in self.matrices.items():
            initial = matrix.initial_accuracies()
            self.results[name] = {
                "average_accuracy": float(matrix.average_accuracy()),
                "forgetting": float(matrix.forgetting()),
                "bwt": float(matrix.bwt()),
                "fwt": float(matrix.fwt()),
                "accuracy_matrix": matrix.matrix().tolist(),
                "initial_accuracies": initial.tolist(),
            }
            log = self._scale_log.get(name)
            if log and self._validated(name):
                self.results[name]["scale"] = [r["scale"] for r in log]
                self.results[name]["scale_validation"] = [
                    {f"{v:g}": a for v, a in zip(r["grid"], r["validation_accuracy"])} for r in log if "grid" in r
                ]

    def _summarise(self, trainer: Trainer, row: int) -> None:
        self._update_results()
        metrics = {}
        for name, result in self.results.items():
            metrics[f"cl/{name}/avg_acc"] = result["average_accuracy"]
            metrics[f"cl/{name}/forgetting"] = result["forgetting"]
            metrics[f"cl/{name}/bwt"] = result["bwt"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        summary = ", ".join(f"{n} {r['average_accuracy']:.3f}" for n, r in self.results.items())
        rank_zero_info(f"ContinualEvaluation after experience {row}: average accuracy {summary}")

    def _save(self, trainer: Trainer) -> None:
        if self.output_dir is None or not trainer.is_global_zero:
            return
        from cl_plugin.metrics.plots import plot_accuracy_matrix

        with atomic_output(self.output_dir / "results.json") as tmp:
            tmp.write_text(json.dumps(self.results, indent=2, allow_nan=True))
        for name, result in self.results.items():
            plot_accuracy_matrix(
                result["accuracy_matrix"],
                self.output_dir / f"accuracy_matrix_{name}.png",
                title=f"{name}: average accuracy {result['average_accuracy']:.3f}",
            )

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        cores = {name: core.state_dict(with_theta0=False, keep_sharded=self._keep_sharded) for name, core in self._cores.items()}
        first = next(iter(self._cores.values()), None)
        theta0 = self._theta0
        if theta0 is not None and first is not None:
            theta0 = first.export(theta0, keep_sharded=self._keep_sharded)  # as the cores' states
        state.update(
            theta0=theta0,
            mergers={name: core_state["merger"] for name, core_state in cores.items()},
            statistics_mergers={
                name: core_state["statistics_merger"] for name, core_state in cores.items() if core_state["statistic_names"]
            },
            matrices={name: m.state_dict() for name, m in self.matrices.items()},
            scale_log={name: [dict(r) for r in log] for name, log in self._scale_log.items()},
        )
        return state

    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner = "ContinualEvaluation"
        finished = state.get("experiences_finished", 0)
        theta0 = state.get("theta0")
        if theta0 is not None:
            theta0 = check_tensor_dict(theta0, "theta0", owner, self._layout, device=torch.device("cpu"))
            first = next(iter(self._cores.values()), None)
            if first is not None:
                theta0 = {n: first.from_checkpoint(n, t, f"theta0[{n!r}]", owner) for n, t in theta0.items()}
        saved_mergers = read(state, "mergers", owner)
        if not isinstance(saved_mergers, Mapping):
            raise CheckpointError(f"The checkpoint's {owner} state has mergers of type {type(saved_mergers).__name__}; expected a mapping.")
        if self._cores and set(saved_mergers) != set(self._cores):
            raise ConfigError(
                f"The checkpoint's {owner} evaluated the methods {sorted(saved_mergers)}, this run evaluates "
                f"{sorted(self._cores)}: a method added now would be reported from fewer experiences than the "
                "others. Resume with the same `compare` (and the same ModelMerging method), or start a new stream."
            )
        saved_statistics = state.get("statistics_mergers") or {}
        applies = []
        for name, merger_state in saved_mergers.items():
            if name not in MERGERS or not isinstance(merger_state, Mapping):
                raise CheckpointError(f"The checkpoint's {owner} state has an unknown method {name!r}; it is damaged.")
            core = self._cores.get(name) or ContinualMerge(
                name, method_options=merger_state.get("options", {}), whole_matrices=False
            )
            names = core.names if core.names is not None else list(merger_state.get("input_dtypes", {}))
            applies.append(
                (
                    name,
                    core,
                    core.prepare_load(
                        {
                            "names": names,
                            "statistic_names": core.statistic_names,
                            "theta0": None,
                            "merger": merger_state,
                            "statistics_merger": saved_statistics.get(name),
                        },
                        f"{owner} {name!r}",
                        theta0_elsewhere=True,
                    ),
                )
            )
            if merger_state.get("num_tasks", 0) != finished:
                raise CheckpointError(
                    f"The checkpoint's {owner} {name!r} merger holds {merger_state.get('num_tasks', 0)} experience(s), "
                    f"its bookkeeping {finished}; it is damaged."
                )
        saved_matrices = read(state, "matrices", owner)
        if not isinstance(saved_matrices, Mapping):
            raise CheckpointError(f"The checkpoint's {owner} state has matrices of type {type(saved_matrices).__name__}; expected a mapping.")
        if self.matrices and set(saved_matrices) != set(self.matrices):
            raise ConfigError(
                f"The checkpoint's {owner} filled the matrices {sorted(saved_matrices)}, this run fills "
                f"{sorted(self.matrices)}. Resume with the same `compare`, `evaluate_training_weights` and "
                "ModelMerging, or start a new stream."
            )
        matrices = {name: _check_matrix(saved, name, self.matrices.get(name), finished) for name, saved in saved_matrices.items()}
        scale_log = _check_scale_log(state.get("scale_log", {}), finished)

        def apply() -> None:
            self._theta0 = theta0
            for name, core, apply_core in applies:
                apply_core()
                self._cores[name] = core
                log = scale_log.get(name)
                if log and self._validated(name):
                    core.scale = log[-1]["scale"]  # the λ chosen at the last boundary
            self._scale_log = scale_log
            self.matrices.update(matrices)
            if self.matrices:
                self._update_results()

        return apply


def _check_scale_log(saved: object, finished: int) -> dict[str, list[dict[str, Any]]]:
    """The checkpoint's per-method λ records (older checkpoints have none), checked."""
    owner = "ContinualEvaluation"
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"The checkpoint's {owner} scale_log is a {type(saved).__name__}; it is damaged.")
    out = {}
    for name, log in saved.items():
        if not isinstance(log, list) or len(log) > finished or not all(isinstance(r, Mapping) for r in log):
            raise CheckpointError(f"The checkpoint's {owner} scale_log[{name!r}] is not one record per finished experience; it is damaged.")
        for r in log:
            value = r.get("scale")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise CheckpointError(f"The checkpoint's {owner} scale_log[{name!r}] holds scale={value!r}; it is damaged.")
        out[str(name)] = [dict(r) for r in log]
    return out


def _check_matrix(saved: object, name: str, like: AccuracyMatrix | None, rows: int) -> AccuracyMatrix:
    """An AccuracyMatrix restored from its saved state (or, from older checkpoints, a matrix of accuracies)."""
    owner = "ContinualEvaluation"
    if isinstance(saved, Tensor):  # written before the matrices saved their counts
        if saved.dim() != 2 or not saved.is_floating_point():
            raise CheckpointError(f"The checkpoint's {owner} matrix {name!r} is not a 2-D floating-point tensor; it is damaged.")
        values = saved[~torch.isnan(saved)]
        if values.numel() and (bool((values < 0).any()) or bool((values > 1).any())):
            raise CheckpointError(f"The checkpoint's {owner} matrix {name!r} holds accuracies outside [0, 1]; it is damaged.")
        matrix = AccuracyMatrix.from_matrix(saved)
    elif isinstance(saved, Mapping):
        shape = tuple(saved["correct"].shape) if isinstance(saved.get("correct"), Tensor) else None
        if shape is None or len(shape) != 2:
            raise CheckpointError(f"The checkpoint's {owner} matrix {name!r} has no (rows, columns) counts; it is damaged.")
        matrix = AccuracyMatrix(*shape)
        try:
            matrix.load_state_dict(dict(saved))
        except Exception as exc:  # noqa: BLE001 - reported as a damaged checkpoint, with the cause
            raise CheckpointError(f"The checkpoint's {owner} matrix {name!r} does not load: {exc}") from None
    else:
        raise CheckpointError(f"The checkpoint's {owner} matrix {name!r} is a {type(saved).__name__}; it is damaged.")
    if like is not None and (matrix.n_experiences, matrix.n_test_experiences) != (like.n_experiences, like.n_test_experiences):
        raise CheckpointError(
            f"The checkpoint's {owner} matrix {name!r} is {matrix.n_experiences}x{matrix.n_test_experiences}, this "
            f"stream's is {like.n_experiences}x{like.n_test_experiences}. Resume with the stream the checkpoint was "
            "written with."
        )
    filled = ~torch.isnan(matrix.matrix())
    if bool(filled[rows:].any()):
        raise CheckpointError(
            f"The checkpoint's {owner} matrix {name!r} has rows past the {rows} finished experience(s); it is damaged."
        )
    return matrix
