"""``ContinualEvaluation``: the accuracy matrix of the training weights and of merged weights.

After every experience the callback evaluates on every test experience and
fills one :class:`~cl_plugin.metrics.AccuracyMatrix` per evaluated model:

* the training weights (``sequential_finetuning`` when the run fine-tunes
  sequentially);
* θ₀ + scale·merged for each method in ``compare`` and for a
  :class:`~cl_plugin.callbacks.ModelMerging` callback's own method. All
  methods fold the same task vectors, so one fine-tuning run gives every
  method's matrix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from cl_plugin._checks import check_bool, check_scale
from cl_plugin._io import atomic_output
from cl_plugin.errors import CheckpointError, ConfigError, did_you_mean
from cl_plugin.merging import MERGERS, get_merger
from cl_plugin.metrics import AccuracyMatrix
from cl_plugin.task_vectors import TaskVector
from cl_plugin.callbacks._boundaries import TaskBoundaryCallback, floating_names, snapshot, write_into
from cl_plugin._checkpoint import check_tensor_dict, layout_of, read
from cl_plugin.callbacks.model_merging import ModelMerging

__all__ = ["ContinualEvaluation", "training_weights_name"]

_TRAINING_NAMES = {
    "finetuned": "sequential_finetuning",
    "pretrained": "independent_finetuning",
    "merged": "finetuning_from_merged",
}


def training_weights_name(start_from: str | None) -> str:
    """The results key of the training weights for a run whose experiences start from ``start_from``."""
    return _TRAINING_NAMES.get(start_from or "finetuned", "sequential_finetuning")


def default_predict(pl_module: LightningModule, batch: Any) -> Tensor:
    """Logits of ``pl_module(x)`` for a batch ``(x, y, ...)``."""
    return pl_module(batch[0])


class ContinualEvaluation(TaskBoundaryCallback):
    """Fill an accuracy matrix per model after every experience; log and save the figures.

    Place it anywhere in ``callbacks=[...]``: at setup it moves itself before
    any ``ModelMerging`` so it sees the training weights before they are
    replaced.

    Args:
        compare: merging methods to evaluate besides the training weights,
            e.g. ``["magmax", "average", "random", "ties", "opcm",
            "task_arithmetic"]``; each folds the same task vectors.
        scales: per-method scale, e.g. ``{"magmax": 0.5}``; default: each
            method's default (or the ``ModelMerging`` callback's scale).
        method_options: per-method options, e.g. ``{"ties": {"top_k": 0.2}}``.
        output_dir: if given, rank 0 writes ``results.json`` and one heatmap
            ``accuracy_matrix_<name>.png`` per model there when ``fit`` ends.
        predict: ``predict(pl_module, batch) -> logits (N, C)``; default
            ``pl_module(batch[0])``. Targets are ``batch[1]``.
        exclude: glob patterns not merged (default: the ``ModelMerging``
            callback's, else none).
        evaluate_training_weights: also evaluate the training weights (default True).

    Raises:
        ConfigError: unknown method, scale out of range, options of a method
            not in ``compare``; at ``setup``, a second ``ContinualEvaluation``
            in the Trainer or a strategy that spawns its processes; when
            resuming, a checkpoint written with other ``compare``, ``scales``,
            ``method_options``, ``exclude`` or ``evaluate_training_weights``
            (the matrices would mix two settings).
        CheckpointError: a damaged checkpoint state or one that does not fit
            the model or the stream.

    Attributes:
        matrices: name -> :class:`~cl_plugin.metrics.AccuracyMatrix`.
        results: name -> dict with ``average_accuracy``, ``forgetting``,
            ``bwt`` and ``accuracy_matrix`` (the ``results.json`` schema).
    """

    _state_name = "ContinualEvaluation"

    def __init__(
        self,
        compare: Iterable[str] = (),
        scales: Mapping[str, float] | None = None,
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        output_dir: str | os.PathLike | None = None,
        predict: Callable[[LightningModule, Any], Tensor] | None = None,
        exclude: Iterable[str] | None = None,
        evaluate_training_weights: bool = True,
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
        self.scales = {}
        for name, value in dict(scales or {}).items():
            if name not in MERGERS:
                raise ConfigError(f"`scales` names an unknown method {name!r}; choose from {sorted(MERGERS)}.")
            self.scales[name] = check_scale(value, f"ContinualEvaluation scales[{name!r}]")
        self.method_options = {k: dict(v) for k, v in dict(method_options or {}).items()}
        for name, options in self.method_options.items():
            if name not in self.compare:
                raise ConfigError(
                    f"`method_options` has options for {name!r}, which is not in `compare` {self.compare}."
                )
            get_merger(name, **options)  # validates the options now
        if predict is not None and not callable(predict):
            raise ConfigError(f"`predict` must be a callable predict(pl_module, batch) -> logits, got {predict!r}.")
        self.predict = predict or default_predict
        self.output_dir = None if output_dir is None else Path(output_dir)
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.exclude = None if exclude is None else tuple(exclude)
        self.evaluate_training_weights = check_bool(evaluate_training_weights, "evaluate_training_weights", "ContinualEvaluation")
        self.matrices: dict[str, AccuracyMatrix] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self._mergers: dict[str, Any] = {}
        self._merging: ModelMerging | None = None
        self._theta0: dict[str, Tensor] | None = None
        self._names: list[str] | None = None
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._training_name = "sequential_finetuning"

    def _options(self) -> dict[str, Any]:
        return {
            "compare": list(self.compare),
            "scales": dict(self.scales),
            "method_options": {k: dict(v) for k, v in self.method_options.items()},
            "exclude": None if self.exclude is None else list(self.exclude),
            "evaluate_training_weights": self.evaluate_training_weights,
        }

    def _second_instance_message(self, same) -> str:
        return (
            f"The Trainer has {len(same)} ContinualEvaluation callbacks; use one. It evaluates the training weights "
            "and every method in `compare` from the same run, e.g. ContinualEvaluation(compare=['magmax', 'ties'])."
        )

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
        self._names = floating_names(pl_module, exclude)
        state = pl_module.state_dict()
        self._layout = layout_of({n: state[n] for n in self._names})
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "test_dataloader"):
            raise ConfigError(
                "ContinualEvaluation needs a datamodule whose test_dataloader() returns one loader per "
                "experience, e.g. cl_plugin.benchmarks.ContinualDataModule."
            )
        n_experiences = len(self._test_loaders(trainer))
        methods = list(self.compare)
        if self._merging is not None and self._merging.method not in methods:
            methods.insert(0, self._merging.method)
        for name in methods:
            if name not in self._mergers:
                options = self.method_options.get(name)
                if options is None and self._merging is not None and self._merging.method == name:
                    options = self._merging.method_options
                self._mergers[name] = get_merger(name, **(options or {}))
        names = ([self._training_name] if self.evaluate_training_weights else []) + methods
        for name in names:
            if name not in self.matrices:
                self.matrices[name] = AccuracyMatrix(n_experiences)

    def _scale(self, method: str) -> float:
        if method in self.scales:
            return self.scales[method]
        if self._merging is not None and self._merging.method == method:
            return self._merging.scale
        return MERGERS[method].default_scale

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._theta0 is None and (self._merging is None or self._merging.base_weights is None):
            self._theta0 = snapshot(pl_module, self._names, torch.device("cpu"))

    def _base(self) -> dict[str, Tensor]:
        if self._merging is not None and self._merging.base_weights is not None:
            return {n: self._merging.base_weights[n] for n in self._names}
        return self._theta0

    # -- evaluation ----------------------------------------------------------------------------
    def _test_loaders(self, trainer: Trainer) -> list[DataLoader]:
        loaders = trainer.datamodule.test_dataloader()
        if isinstance(loaders, DataLoader):
            loaders = [loaders]
        return list(loaders)

    def _shard(self, loader: DataLoader, trainer: Trainer) -> DataLoader:
        """This rank's share of a test loader: every ``world_size``-th example, none twice."""
        if trainer.world_size <= 1:
            return loader
        indices = list(range(trainer.global_rank, len(loader.dataset), trainer.world_size))
        return DataLoader(
            Subset(loader.dataset, indices),
            batch_size=loader.batch_size or 256,
            shuffle=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
        )

    @torch.no_grad()
    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, matrix: AccuracyMatrix, row: int) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            for j, loader in enumerate(self._test_loaders(trainer)):
                for batch in self._shard(loader, trainer):
                    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                    logits = self.predict(pl_module, batch)
                    matrix.update(logits.detach().cpu(), batch[1].detach().cpu(), row, j)
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
        if self.evaluate_training_weights:
            self._evaluate(trainer, pl_module, self.matrices[self._training_name], row)
        if self._mergers:
            base = self._base()
            current = snapshot(pl_module, self._names, torch.device("cpu"))
            task_vector = TaskVector.between(current, base)
            try:
                for name, merger in self._mergers.items():
                    merger.update(task_vector)
                    write_into(pl_module, merger.merged().apply_to(base, self._scale(name)))
                    self._evaluate(trainer, pl_module, self.matrices[name], row)
            finally:
                write_into(pl_module, current)
        self._summarise(trainer, row)
        if at_fit_end:
            self._save(trainer)

    def _update_results(self) -> None:
        for name, matrix in self.matrices.items():
            self.results[name] = {
                "average_accuracy": float(matrix.average_accuracy()),
                "forgetting": float(matrix.forgetting()),
                "bwt": float(matrix.bwt()),
                "accuracy_matrix": matrix.matrix().tolist(),
            }

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
        state.update(
            theta0=self._theta0,
            mergers={name: m.state_dict() for name, m in self._mergers.items()},
            matrices={name: m.matrix().clone() for name, m in self.matrices.items()},
        )
        return state

    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner = "ContinualEvaluation"
        finished = state.get("experiences_finished", 0)
        theta0 = state.get("theta0")
        if theta0 is not None:
            theta0 = check_tensor_dict(theta0, "theta0", owner, self._layout, device=torch.device("cpu"))
        saved_mergers = read(state, "mergers", owner)
        if not isinstance(saved_mergers, Mapping):
            raise CheckpointError(f"The checkpoint's {owner} state has mergers of type {type(saved_mergers).__name__}; expected a mapping.")
        if self._mergers and set(saved_mergers) != set(self._mergers):
            raise ConfigError(
                f"The checkpoint's {owner} evaluated the methods {sorted(saved_mergers)}, this run evaluates "
                f"{sorted(self._mergers)}: a method added now would be reported from fewer experiences than the "
                "others. Resume with the same `compare` (and the same ModelMerging method), or start a new stream."
            )
        mergers = {}
        for name, merger_state in saved_mergers.items():
            if name not in MERGERS or not isinstance(merger_state, Mapping):
                raise CheckpointError(f"The checkpoint's {owner} state has an unknown method {name!r}; it is damaged.")
            merger = self._mergers[name] if name in self._mergers else None
            options = dict(merger.options()) if merger is not None else dict(merger_state.get("options", {}))
            candidate = get_merger(name, **options)
            candidate.load_state_dict(merger_state)  # raises on other options, or on a damaged state
            if candidate.num_tasks != finished:
                raise CheckpointError(
                    f"The checkpoint's {owner} {name!r} merger holds {candidate.num_tasks} experience(s), its "
                    f"bookkeeping {finished}; it is damaged."
                )
            mergers[name] = candidate
        saved_matrices = read(state, "matrices", owner)
        if not isinstance(saved_matrices, Mapping):
            raise CheckpointError(f"The checkpoint's {owner} state has matrices of type {type(saved_matrices).__name__}; expected a mapping.")
        if self.matrices and set(saved_matrices) != set(self.matrices):
            raise ConfigError(
                f"The checkpoint's {owner} filled the matrices {sorted(saved_matrices)}, this run fills "
                f"{sorted(self.matrices)}. Resume with the same `compare`, `evaluate_training_weights` and "
                "ModelMerging, or start a new stream."
            )
        matrices = {}
        for name, matrix in saved_matrices.items():
            size = self.matrices[name].n_experiences if name in self.matrices else None
            matrices[name] = _check_matrix(matrix, name, size, finished)

        def apply() -> None:
            self._theta0 = theta0
            self._mergers.update(mergers)
            self.matrices.update(matrices)
            if self.matrices:
                self._update_results()

        return apply


def _check_matrix(matrix: object, name: str, size: int | None, rows: int) -> AccuracyMatrix:
    """An AccuracyMatrix from a saved ``(T, T)`` matrix of accuracies in [0, 1] (NaN: not evaluated)."""
    owner = "ContinualEvaluation"
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.is_floating_point():
        raise CheckpointError(f"The checkpoint's {owner} matrix {name!r} is not a square floating-point tensor; it is damaged.")
    if size is not None and matrix.shape[0] != size:
        raise CheckpointError(
            f"The checkpoint's {owner} matrix {name!r} is {tuple(matrix.shape)}, this stream has {size} test "
            "experiences. Resume with the stream the checkpoint was written with."
        )
    values = matrix[~torch.isnan(matrix)]
    if values.numel() and (bool((values < 0).any()) or bool((values > 1).any())):
        raise CheckpointError(f"The checkpoint's {owner} matrix {name!r} holds accuracies outside [0, 1]; it is damaged.")
    if bool(torch.isnan(matrix[rows:]).logical_not().any()):
        raise CheckpointError(
            f"The checkpoint's {owner} matrix {name!r} has rows past the {rows} finished experience(s); it is damaged."
        )
    return AccuracyMatrix.from_matrix(matrix)
