"""What a boundary reads from data: an experience's diagonal Fisher, and λ chosen on validation data.

Shared by :class:`~cl_plugin.callbacks.ModelMerging` and
:class:`~cl_plugin.callbacks.ContinualEvaluation`, so both estimate the Fisher
and choose λ the same way:

* :func:`experience_fisher`: the empirical diagonal Fisher of the trained
  weights on the experience's own training data (the first ``n_batches``
  batches of its training loader), from the module's own loss, averaged over
  the DDP ranks so every rank folds the same F;
* :func:`choose_scale`: λ from a grid by accuracy on the validation loaders of
  the experiences seen so far (never the test loaders).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from cl_plugin.errors import ConfigError, NonFiniteError
from cl_plugin.merging.continual import ContinualMerge
from cl_plugin.merging.fisher import diagonal_fisher

__all__ = [
    "DEFAULT_FISHER_BATCHES",
    "SCALE_GRID_FACTORS",
    "check_scale_grid",
    "choose_scale",
    "default_predict",
    "default_target",
    "experience_fisher",
    "scale_grid_for",
    "validation_loaders",
]

#: Batches of an experience's training data its Fisher is estimated from (``fisher_batches``).
DEFAULT_FISHER_BATCHES = 8
#: The seed of the random draws (dropout) of experience k's Fisher estimate is FISHER_SEED + k.
FISHER_SEED = 20_251
#: The default grid of ``scale="validate"``: the method's default λ times these factors
#: (MagMax 0.1 ... 1.0, task arithmetic 0.06 ... 0.6, average/OPCM/DOP/Fisher 0.2 ... 2.0).
SCALE_GRID_FACTORS = tuple(round(0.2 * i, 1) for i in range(1, 11))

#: Keys a mapping batch (e.g. from Hugging Face) may hold its targets under, in the order tried.
_TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def default_target(batch: Any) -> Tensor:
    """The targets of a batch: ``batch[1]`` of a sequence ``(x, y, ...)``, or the ``labels`` entry of a mapping.

    Raises:
        ConfigError: a mapping without one of ``labels``, ``label``, ``targets``, ``target``, ``y``.
    """
    if isinstance(batch, Mapping):
        for key in _TARGET_KEYS:
            if key in batch:
                return batch[key]
        raise ConfigError(
            f"ContinualEvaluation cannot find the targets in a batch with keys {sorted(batch)}; pass "
            "`target=lambda batch: batch['<key>']`."
        )
    return batch[1]


def default_predict(pl_module: LightningModule, batch: Any) -> Tensor:
    """Logits for a batch: ``pl_module(x)`` for ``(x, y, ...)``; ``pl_module(**inputs)`` for a mapping.

    A mapping's target entry (``labels``, ...) is left out of the inputs, and
    an output with a ``logits`` attribute or key (Hugging Face models) gives
    its logits.
    """
    if isinstance(batch, Mapping):
        out = pl_module(**{k: v for k, v in batch.items() if k not in _TARGET_KEYS})
    else:
        out = pl_module(batch[0])
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    return getattr(out, "logits", out)


# -- the Fisher of an experience ---------------------------------------------------------------


def check_fisher_batches(value: object, owner: str) -> int:
    """``fisher_batches`` as a positive int, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"`fisher_batches` must be an int >= 1, got {value!r} ({owner}).")
    return int(value)


@contextlib.contextmanager
def _logging_silenced(pl_module: LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside the block (a ``training_step`` run at a boundary logs nothing)."""
    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                pl_module.__dict__[name] = saved[name]
            else:
                pl_module.__dict__.pop(name, None)


def training_step_loss(pl_module: LightningModule, batch: Any, batch_idx: int) -> Tensor:
    """The loss ``pl_module.training_step(batch, batch_idx)`` returns (a tensor, or a dict's ``"loss"``).

    Raises:
        ConfigError: ``training_step`` returns no loss.
    """
    out = pl_module.training_step(batch, batch_idx)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"ModelMerging('fisher') estimates each experience's Fisher from the loss `training_step` returns, but it "
            f"returned {type(out).__name__}. Return the loss (or a dict with 'loss'), or pass "
            "`fisher_loss=lambda module, batch: <scalar loss>`."
        )
    return out


def check_fisher_loss_source(pl_module: LightningModule, fisher_loss: Callable | None, owner: str) -> None:
    """Refuse to run ``training_step`` for the Fisher of a module that steps its optimizers itself."""
    if fisher_loss is None and not pl_module.automatic_optimization:
        raise ConfigError(
            f"{owner} estimates each experience's Fisher from the loss of `training_step`, but "
            f"{type(pl_module).__name__} uses manual optimization: its `training_step` steps the optimizers itself, "
            "and running it at a boundary would train. Pass `fisher_loss=lambda module, batch: <scalar loss>`."
        )


def refuse_fisher_on_dtensors(pl_module: LightningModule, owner: str) -> None:
    """Refuse Fisher merging on FSDP2 parameters: a gradient outside the training step is not gathered from the shards."""
    from cl_plugin.merging.continual import is_dtensor

    if any(is_dtensor(p) for p in pl_module.parameters()):
        raise ConfigError(
            f"{owner}: Fisher merging does not run under FSDP2 (ModelParallelStrategy): the Fisher is estimated "
            "outside the training step, where the sharded parameters' gradients are not reduced. Use "
            "strategy='ddp' for 'fisher' (every rank estimates on its own batches and the Fisher is averaged), or "
            "another method under FSDP2."
        )


def fisher_loader(trainer: Trainer, experience: int, at_fit_end: bool) -> Any:
    """The training loader of ``experience``: the datamodule's for that experience, else the Trainer's at fit end.

    In one ``fit`` over a :class:`~cl_plugin.benchmarks.ContinualDataModule`
    the boundary is seen after Lightning has built the next experience's
    loader, so the finished experience's loader comes from the datamodule
    (:meth:`~cl_plugin.benchmarks.ContinualDataModule.experience_train_dataloader`:
    its last epoch's order; the same batches in a resumed run). When ``fit``
    ends (one ``fit`` per experience) the Trainer's loader is the experience's own.

    Raises:
        ConfigError: neither is available.
    """
    datamodule = getattr(trainer, "datamodule", None)
    n = getattr(datamodule, "n_experiences", None)
    if hasattr(datamodule, "experience_train_dataloader") and isinstance(n, int) and 0 <= experience < n:
        return datamodule.experience_train_dataloader(experience)
    loader = getattr(trainer, "train_dataloader", None) if at_fit_end else None
    if loader is None or isinstance(loader, (Mapping, list, tuple)):
        raise ConfigError(
            f"Fisher merging needs experience {experience}'s training data at its boundary"
            + (
                ", but the Trainer has moved on to the next experience's loader and the datamodule gives no loader "
                "of a past experience"
                if not at_fit_end
                else ", but the Trainer holds no single training loader"
            )
            + ". Train with cl_plugin.benchmarks.ContinualDataModule (it gives every experience's training loader), "
            "or run one `fit` per experience with one training DataLoader."
        )
    return loader


def experience_fisher(
    trainer: Trainer,
    pl_module: LightningModule,
    core: ContinualMerge,
    experience: int,
    at_fit_end: bool,
    *,
    n_batches: int = DEFAULT_FISHER_BATCHES,
    loss: Callable[[LightningModule, Any], Tensor] | None = None,
) -> dict[str, Tensor]:
    """The empirical diagonal Fisher of the module's trained weights on ``experience``'s training data.

    F[n] = (1/B) Σ_b (∂L_b/∂θ_n)² over the first ``n_batches`` batches of the
    experience's training loader (:func:`fisher_loader`), each moved through
    the batch-transfer hooks as in training, with L_b the module's own loss
    (``training_step(batch, b)``, its ``self.log`` calls ignored) or
    ``loss(pl_module, batch)``: the loss the experience was trained with,
    computed with the module in the modes training left it in (a training-only
    behaviour such as ``ClassIncrementalMasking``'s mask applies). What the
    estimate must not change is kept: random draws (dropout) come from a
    generator forked from the training one and seeded by the experience, so
    the training's random stream is untouched and the estimate is the same in
    a resumed run; the running statistics of normalisation layers are put back
    afterwards; ``.grad`` is left as it was.

    Under DDP each rank estimates on its own shard of the batches and the
    Fishers are averaged over the ranks (all-reduce), so every rank folds
    the same F.

    Returns:
        name -> F, whole tensors on the module's device, for every name the
        core merges. A merged tensor without a gradient (a buffer, a frozen
        parameter) gets F = 0 everywhere: every entry the same weight, so with
        ``min_fisher > 0`` (the default) it is averaged across tasks with the
        task weights alone, and with ``min_fisher=0`` it keeps θ₀.
    """
    loader = fisher_loader(trainer, experience, at_fit_end)
    names = core.names or []
    trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad and p.is_floating_point()}
    with_grad = [n for n in names if n in trainable]

    def batches() -> Iterator[Any]:
        for i, batch in enumerate(loader):
            if i >= n_batches:
                return
            yield i, trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    def loss_fn(module: LightningModule, item: tuple[int, Any]) -> Tensor:
        i, batch = item
        return loss(module, batch) if loss is not None else training_step_loss(module, batch, i)

    statistics = [
        (b, b.detach().clone())
        for m in pl_module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for b in m.buffers(recurse=False)
    ]
    cuda = sorted({p.device.index or 0 for p in pl_module.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), _logging_silenced(pl_module), torch.enable_grad():
            torch.manual_seed(FISHER_SEED + experience)
            fisher = diagonal_fisher(pl_module, batches(), loss_fn, names=with_grad) if with_grad else {}
    finally:
        with torch.no_grad():
            for buffer, saved in statistics:
                buffer.copy_(saved)
    state = pl_module.state_dict()
    out: dict[str, Tensor] = {}
    for n in names:
        f = fisher.get(n)
        out[n] = f if f is not None else torch.zeros(state[n].shape, dtype=torch.float32, device=state[n].device)
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        for f in out.values():
            torch.distributed.all_reduce(f)
            f.div_(trainer.world_size)
    return out


# -- λ chosen on validation data ---------------------------------------------------------------------


def check_scale_grid(grid: object, owner: str) -> tuple[float, ...] | None:
    """``scale_grid`` as a sorted tuple of distinct λ in (0, 10], or None; else ConfigError."""
    if grid is None:
        return None
    from cl_plugin._checks import check_scale

    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise ConfigError(f"`scale_grid` must be a non-empty list of scales in (0, 10] or None, got {grid!r} ({owner}).")
    values = [check_scale(v, f"{owner} scale_grid") for v in grid]
    return tuple(sorted(set(values)))


def scale_grid_for(default_scale: float, grid: Sequence[float] | None) -> tuple[float, ...]:
    """The λ grid: ``grid`` when given, else ``default_scale`` times :data:`SCALE_GRID_FACTORS`."""
    if grid is not None:
        return tuple(grid)
    return tuple(sorted({round(default_scale * f, 6) for f in SCALE_GRID_FACTORS}))


def validation_loaders(trainer: Trainer, owner: str) -> list[DataLoader]:
    """One validation loader per experience, from a datamodule with a real validation stream; else ConfigError."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "experience_dataloaders"):
        raise ConfigError(
            f"{owner}: `scale='validate'` chooses λ on the validation data of the experiences seen so far, and "
            "needs a datamodule that gives one validation loader per experience: use "
            "cl_plugin.benchmarks.ContinualDataModule with a benchmark that has a `valid_stream`."
        )
    if not getattr(datamodule, "has_validation_stream", False):
        raise ConfigError(
            f"{owner}: `scale='validate'` chooses λ on validation data, never on the test data, but this "
            "datamodule's benchmark has no `valid_stream` (one experience per training experience), so its "
            "validation loaders are the test loaders. Build the stream with a validation stream: "
            "split_digits/permuted_digits/rotated_digits(..., validation_stream=True), or Avalanche's "
            "benchmark_with_validation_stream(benchmark, validation_size=0.2) / "
            "benchmark_from_datasets(train=..., valid=..., test=...)."
        )
    return list(datamodule.experience_dataloaders("val"))


#: How many bytes of batches a :class:`ReplayLoader` keeps; past that it reads its loader again on every pass.
REPLAY_BUDGET_BYTES = 256 * 2**20


def _nbytes(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.element_size() * batch.numel()
    if isinstance(batch, Mapping):
        return sum(_nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_nbytes(v) for v in batch)
    return 0


class ReplayLoader:
    """An evaluation loader read once and replayed: the λ grid evaluates the same batches many times.

    The first pass reads ``loader`` and keeps its batches (as the loader
    yields them, before any transfer to a device) while they fit in
    ``budget_bytes``; later passes replay them. Past the budget it keeps
    nothing and every pass reads the loader again. An unshuffled loader gives
    the same batches either way (the evaluation loaders are unshuffled).
    """

    def __init__(self, loader: Any, budget_bytes: int = REPLAY_BUDGET_BYTES) -> None:
        self.loader = loader
        self.budget_bytes = budget_bytes
        self._batches: list[Any] | None = None
        self._over_budget = False

    @property
    def dataset(self) -> Any:
        """The dataset of the loader replayed (this rank's share of it under DDP)."""
        return self.loader.dataset

    def __iter__(self) -> Iterator[Any]:
        if self._batches is not None:
            yield from self._batches
            return
        kept: list[Any] | None = None if self._over_budget else []
        size = 0
        for batch in self.loader:
            if kept is not None:
                size += _nbytes(batch)
                if size > self.budget_bytes:
                    kept, self._over_budget = None, True
                else:
                    kept.append(batch)
            yield batch
        if kept is not None:
            self._batches = kept


def evaluation_views(loaders: Sequence[DataLoader], trainer: Trainer) -> list[ReplayLoader]:
    """This rank's share of each evaluation loader, replayable (see :class:`ReplayLoader`)."""
    return [ReplayLoader(shard_loader(loader, trainer)) for loader in loaders]


def shard_loader(loader: DataLoader, trainer: Trainer) -> DataLoader:
    """This rank's share of an evaluation loader: every ``world_size``-th example, none twice."""
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
def accuracies(
    trainer: Trainer,
    pl_module: LightningModule,
    loaders: Sequence[DataLoader],
    predict: Callable[[LightningModule, Any], Tensor],
    target: Callable[[Any], Tensor],
    classes: Sequence[Sequence[int]] | None = None,
) -> list[float]:
    """The module's accuracy on each loader (counts summed over the DDP ranks, each rank on its share).

    Predictions and targets as ContinualEvaluation makes them: ``predict``,
    ``target``, and with ``classes`` the logits masked to loader ``j``'s classes.
    ``loaders`` may be :func:`evaluation_views` (already this rank's share).
    """
    from cl_plugin.metrics.functional import _count_correct
    from cl_plugin.metrics.task_aware import mask_to_classes

    was_training = pl_module.training
    pl_module.eval()
    counts = torch.zeros(len(loaders), 2, dtype=torch.float64)
    try:
        for j, loader in enumerate(loaders):
            for batch in loader if isinstance(loader, ReplayLoader) else shard_loader(loader, trainer):
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=j)
                logits = predict(pl_module, batch)
                if classes is not None:
                    logits = mask_to_classes(logits, classes[j])
                correct, total = _count_correct(logits.detach().cpu(), target(batch).detach().cpu())
                counts[j, 0] += float(correct)
                counts[j, 1] += float(total)
    finally:
        pl_module.train(was_training)
    if trainer.world_size > 1:
        counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
    return [float(c / t) if t > 0 else math.nan for c, t in counts.tolist()]


def choose_scale(
    core: ContinualMerge,
    trainer: Trainer,
    pl_module: LightningModule,
    loaders: Sequence[DataLoader],
    grid: Sequence[float],
    predict: Callable[[LightningModule, Any], Tensor],
    target: Callable[[Any], Tensor],
    classes: Sequence[Sequence[int]] | None = None,
) -> tuple[float, list[float]]:
    """λ of ``grid`` whose θ₀ + λ·merged is most accurate on ``loaders``, and every λ's accuracy.

    The accuracy is the mean over ``loaders`` of each one's accuracy (the
    average accuracy over the experiences seen, as the accuracy matrix
    defines it). Ties go to the smallest λ; a λ whose merge overflows scores
    NaN and is never chosen. The module is left holding
    θ₀ + λ·merged of the last λ tried: the caller writes what it needs next.
    Every rank takes the same decision (the counts are summed over ranks).
    """
    views = [v if isinstance(v, ReplayLoader) else ReplayLoader(shard_loader(v, trainer)) for v in loaders]
    scores = []
    for value in grid:
        try:
            core.write_merged(pl_module, scale=value)
        except NonFiniteError:  # θ₀ + λ·merged overflows at this λ (every rank agrees): not a candidate
            scores.append(math.nan)
            continue
        per_loader = accuracies(trainer, pl_module, views, predict, target, classes)
        defined = [a for a in per_loader if not math.isnan(a)]
        scores.append(sum(defined) / len(defined) if defined else math.nan)
    if all(math.isnan(v) for v in scores):
        raise NonFiniteError(
            f"No λ of the grid {list(grid)} gives finite merged weights or a validation accuracy; use smaller scales."
        )
    best = max(range(len(grid)), key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))
    return float(grid[best]), scores
