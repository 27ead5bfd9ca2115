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

from cl_plugin._checks import check_scale
from cl_plugin.errors import ConfigError, did_you_mean
from cl_plugin.merging import MERGERS, get_merger
from cl_plugin.metrics import AccuracyMatrix
from cl_plugin.task_vectors import TaskVector
from cl_plugin.callbacks._boundaries import TaskBoundaryCallback, floating_names, snapshot, write_into
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
            not in ``compare``.

    Attributes:
        matrices: name -> :class:`~cl_plugin.metrics.AccuracyMatrix`.
        results: name -> dict with ``average_accuracy``, ``forgetting``,
            ``bwt`` and ``accuracy_matrix`` (the ``results.json`` schema).
    """

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
        self.exclude = None if exclude is None else tuple(exclude)
        self.evaluate_training_weights = bool(evaluate_training_weights)
        self.matrices: dict[str, AccuracyMatrix] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self._mergers: dict[str, Any] = {}
        self._merging: ModelMerging | None = None
        self._theta0: dict[str, Tensor] | None = None
        self._names: list[str] | None = None
        self._training_name = "sequential_finetuning"

    # -- setup ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        merging = [cb for cb in trainer.callbacks if isinstance(cb, ModelMerging)]
        if len(merging) > 1:
            raise ConfigError("ContinualEvaluation supports one ModelMerging callback per Trainer; found several.")
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
                "accuracy_matrix": matrix.compute().tolist(),
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

        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "results.json", "w") as f:
            json.dump(self.results, f, indent=2, allow_nan=True)
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
            format_version=1,
            theta0=self._theta0,
            mergers={name: m.state_dict() for name, m in self._mergers.items()},
            matrices={name: m.compute().clone() for name, m in self.matrices.items()},
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._theta0 = state_dict.get("theta0")
        for name, merger_state in state_dict.get("mergers", {}).items():
            if name not in MERGERS:
                continue
            merger = get_merger(name, **merger_state.get("options", {}))
            if merger_state.get("num_tasks", 0):
                merger.load_state_dict(merger_state)
            self._mergers[name] = merger
        for name, matrix in state_dict.get("matrices", {}).items():
            self.matrices[name] = AccuracyMatrix.from_matrix(matrix)
        if self.matrices:
            self._update_results()
