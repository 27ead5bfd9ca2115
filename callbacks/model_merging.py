"""``ModelMerging``: fold a task vector into a merger at every task boundary.

At the end of each experience the callback takes τ = θ − θ₀ over the model's
floating-point tensors and folds it into a streaming merger from
:mod:`cl_plugin.merging` (MagMax by default: Marczak et al., ECCV 2024). When
``fit`` ends the module holds θ₀ + scale·merged; the next experience starts
from the weights ``start_from`` names.

Two things only a callback can do without the user writing code, because it
has the data at the boundary: Fisher-weighted merging (``method="fisher"``
estimates each experience's diagonal Fisher from its own training data) and
λ chosen on held-out data (``scale="validate"``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from cl_plugin._checks import check_bool, check_same_layout, check_scale, is_finite
from cl_plugin.errors import CheckpointError, ConfigError, DivergedError, DtypeMismatchError, NonFiniteError, did_you_mean
from cl_plugin.merging.continual import ContinualMerge, check_exclude, is_dtensor, merge_method_options
from cl_plugin.callbacks._boundary_data import (
    DEFAULT_FISHER_BATCHES,
    check_fisher_batches,
    check_fisher_loss_source,
    check_scale_grid,
    choose_scale,
    experience_fisher,
    refuse_fisher_on_dtensors,
    scale_grid_for,
    validation_loaders,
)
from cl_plugin.callbacks._boundaries import (
    TaskBoundaryCallback,
    check_ranks_agree,
    check_base_weights,
    load_base_weights,
    merge_shard,
    reset_optimizer_state,
)
from cl_plugin._checkpoint import check_bool_field, check_tensor_dict

__all__ = ["ModelMerging"]

START_FROM = ("finetuned", "pretrained", "merged")
#: The value of ``scale`` that chooses λ on validation data at every boundary.
VALIDATE = "validate"


def check_snapshot_device(device: torch.device, owner: str) -> None:
    """Raise unless tensors can be kept on ``device`` on this machine (checked when the Trainer is known)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"`snapshot_device` is {str(device)!r}, but this machine has no CUDA device ({owner}). "
                "Use snapshot_device='cpu' (the default)."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"`snapshot_device` is {str(device)!r}, but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s) ({owner}). Use snapshot_device='cpu' or an existing device."
            )
    elif device.type not in ("cpu",) and not hasattr(torch, device.type):
        raise ConfigError(f"`snapshot_device` {str(device)!r} is not a device type this torch knows ({owner}).")


class ModelMerging(TaskBoundaryCallback):
    """Merge task vectors at task boundaries with MagMax, OPCM, TIES, ...

    Add it to the Trainer you already have; nothing in the LightningModule changes::

        trainer = Trainer(callbacks=[ModelMerging(method="magmax")], ...)

    Args:
        method: a name in :data:`cl_plugin.merging.MERGERS` (default ``"magmax"``).
        scale: λ in θ₀ + λ·merged, in (0, 10]; ``None`` (default) is the
            method's own default (MagMax 0.5, OPCM 1.0, TIES 0.55, ...);
            ``"validate"`` chooses λ from ``scale_grid`` at every boundary by
            accuracy on the *validation* loaders of the experiences seen so far
            (the datamodule's ``experience_dataloaders("val")``; never the test
            loaders), predictions and targets made as ``ContinualEvaluation``
            makes them (its ``predict``/``target``/``task_aware`` when one is in
            the Trainer). Each choice is in :attr:`scale_log` and in the
            checkpoint; until the first boundary, λ is the method's default.
        start_from: where the next experience's training starts:
            ``"finetuned"`` (default: keep training the fine-tuned weights,
            sequential fine-tuning as in MagMax), ``"pretrained"`` (reset to
            θ₀: independent fine-tuning) or ``"merged"`` (θ₀ + scale·merged).
        exclude: glob patterns of state-dict names that are not merged (e.g.
            ``("head.*",)``); they keep their trained values.
        snapshot_device: where θ₀, the merger's state and the kept training
            weights live (default ``"cpu"``, so a large model costs no
            accelerator memory).
        base_weights: θ₀ as a state dict or a ``.safetensors`` path, in the
            model's dtypes; default: the model's weights when training starts.
        reset_optimizer: clear the optimizers' state (momentum, Adam moments)
            at every boundary (default True), so a reset to θ₀ carries no stale
            momentum. Learning-rate schedulers are not reset.
        check_ranks: under DDP, compare a checksum of the weights across
            ranks after every boundary and raise if they differ (a debugging
            aid; costs one all-gather per boundary). Default: on when the
            environment variable ``CL_PLUGIN_DEBUG=1``.
        verbose: print a line per boundary on rank 0 (default False).
        statistics: how normalisation statistics (BatchNorm running mean and
            variance) are merged: ``"average"`` (default: the mean of the
            statistics each experience ended with; always valid) or
            ``"merge"`` (with the method, like any tensor; a merged negative
            variance is reported with a warning).
        scale_grid: the λ tried with ``scale="validate"`` (values in (0, 10]);
            default: the method's default λ times 0.2, 0.4, ..., 2.0 (MagMax
            0.1 ... 1.0; average, OPCM, DOP and Fisher 0.2 ... 2.0). Ties go
            to the smallest λ.
        fisher_batches: ``method="fisher"`` only: how many batches of each
            experience's training loader its diagonal Fisher is estimated from
            (default 8). The loader is the experience's own: in one ``fit``
            over a :class:`~cl_plugin.benchmarks.ContinualDataModule`, its
            ``experience_train_dataloader(k)`` (the experience's last epoch's
            order, the same in a resumed run); with one ``fit`` per experience,
            the Trainer's training loader when ``fit`` ends.
        fisher_loss: ``method="fisher"`` only: ``fisher_loss(pl_module, batch)
            -> scalar loss`` for the empirical Fisher; default the loss
            ``pl_module.training_step(batch, i)`` returns (its ``self.log``
            calls ignored; required with manual optimization). The Fisher is
            F = mean over batches of (∂loss/∂θ)², with the module in its
            training modes (training-only behaviour such as
            ``ClassIncrementalMasking`` applies; dropout draws from a forked,
            seeded generator; normalisation statistics are put back),
            averaged over the DDP ranks; a
            merged tensor without a gradient (a buffer, a frozen parameter)
            gets F = 0, i.e. the same weight for every entry (with the default
            ``min_fisher=1e-6`` it is averaged with the task weights alone).
        method_options: the merger's options as one mapping, e.g.
            ``{"alpha": 0.5}`` for OPCM (the form a LightningCLI YAML file
            uses); the same as passing them as keywords.
        **method_options: passed to the merger, e.g. ``alpha=0.5`` for OPCM,
            ``top_k=0.2`` for TIES, ``seed=0`` for random.

    Raises:
        ConfigError: unknown method or option, ``scale`` out of range (or a
            string other than ``"validate"``), ``scale_grid`` without
            ``scale="validate"``, ``fisher_batches``/``fisher_loss`` with a
            method other than ``"fisher"``, unknown ``start_from``, bad
            ``exclude`` or ``snapshot_device``; at ``setup``: a second
            ``ModelMerging`` (or an adapter callback) in the Trainer, a
            strategy that spawns its processes, a ``snapshot_device`` this
            machine lacks, ``scale="validate"`` without a datamodule that has
            a validation stream, ``"fisher"`` with manual optimization and no
            ``fisher_loss``; at ``fit`` start, ``"fisher"`` under FSDP2; when
            resuming, a checkpoint written with another ``method``,
            ``method_options``, ``start_from``, ``exclude``, ``scale_grid``,
            ``fisher_batches``, or with ``scale="validate"`` on one side only.
        CheckpointError: a damaged checkpoint state, one that does not fit the
            model, or a checkpoint of a run that trained without this callback.
        NonFiniteError: θ₀ holds NaN/inf; the weights diverged during an
            experience (the module is put back as it was before the
            experience, see docs/callbacks.md).

    Attributes:
        merger: the streaming merger; ``merger.num_tasks`` experiences are folded.
        validate_scale: True with ``scale="validate"``.
        scale_grid: the λ tried with ``scale="validate"`` (a tuple), else None.
        scale_log: with ``scale="validate"``, one record per boundary:
            ``{"experience", "scale" (the λ chosen), "grid", "validation_accuracy"
            (per λ of the grid, the mean accuracy over the experiences seen)}``.

    After ``fit`` the module holds θ₀ + scale·merged, and so does every
    checkpoint file Lightning wrote at the end of that ``fit`` that
    ``ckpt_path="last"`` (or ``"best"`` without a ``monitor``) would load: the
    callback writes them again with the merged weights. A ``ModelCheckpoint``
    with a ``monitor`` keeps the epochs with the best score: those hold one
    epoch's training weights, not a merge (a warning says so).

    .. note:: One ``ModelMerging`` per Trainer: its checkpoint state is kept
       under the key ``"ModelMerging"`` whatever its settings, so Lightning
       refuses a second instance when the Trainer is built. To compare methods
       on one run, use ``ContinualEvaluation(compare=[...])``.
    """

    _state_name = "ModelMerging"

    @property
    def _changeable_options(self) -> frozenset[str]:  # type: ignore[override]
        # A numeric ``scale`` is applied only when weights are written (and, with
        # ``start_from="merged"``, when an experience starts), never folded into the
        # merger's state: a resumed run may change it. A validated one may not: the
        # choices so far come back from the checkpoint (see _saved_options).
        return frozenset() if self.validate_scale else frozenset({"scale"})

    def __init__(
        self,
        method: str = "magmax",
        scale: float | str | None = None,
        start_from: str = "finetuned",
        exclude: Iterable[str] = (),
        snapshot_device: str | torch.device = "cpu",
        base_weights: Mapping[str, Tensor] | str | os.PathLike | None = None,
        reset_optimizer: bool = True,
        check_ranks: bool | None = None,
        verbose: bool = False,
        statistics: str = "average",
        method_options: Mapping[str, Any] | None = None,
        scale_grid: Sequence[float] | None = None,
        fisher_batches: int | None = None,
        fisher_loss: Callable[[LightningModule, Any], Tensor] | None = None,
        **more_method_options: Any,
    ) -> None:
        super().__init__()
        options = merge_method_options(method_options, more_method_options, "ModelMerging")
        validate_scale = isinstance(scale, str)
        if validate_scale and scale != VALIDATE:
            raise ConfigError(
                f"`scale` must be a number in (0, 10], None (the method's default) or {VALIDATE!r} (chosen on "
                f"validation data), got {scale!r} (ModelMerging).{did_you_mean(scale, (VALIDATE,))}"
            )
        grid = check_scale_grid(scale_grid, "ModelMerging")
        if grid is not None and not validate_scale:
            raise ConfigError(
                f"`scale_grid` ({list(grid)}) is the λ tried with scale='validate', but `scale` is {scale!r} "
                "(ModelMerging). Pass scale='validate', or drop `scale_grid`."
            )
        exclude = check_exclude(exclude, "ModelMerging")
        try:
            device = torch.device(snapshot_device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"`snapshot_device` {snapshot_device!r} is not a torch device: {exc}.") from None
        if device.type == "meta":
            raise ConfigError(
                "`snapshot_device='meta'` holds no values, so θ₀ and the merge could not be kept (ModelMerging). "
                "Use 'cpu' (the default) or an accelerator device."
            )
        if start_from not in START_FROM:
            raise ConfigError(
                f"`start_from` must be one of {list(START_FROM)}, got {start_from!r} (ModelMerging)."
                + did_you_mean(str(start_from), START_FROM)
            )
        self.core = ContinualMerge(
            method,
            scale=None if validate_scale else scale,
            exclude=exclude,
            statistics=statistics,
            device=device,
            method_options=options,
        )
        self._requires_fisher = bool(getattr(self.core.merger, "requires_fisher", False))
        if not self._requires_fisher and (fisher_batches is not None or fisher_loss is not None):
            given = "`fisher_batches`" if fisher_batches is not None else "`fisher_loss`"
            raise ConfigError(
                f"{given} applies to method='fisher' (each experience's Fisher weighs its task vector), but `method` "
                f"is {method!r} (ModelMerging). Use method='fisher', or drop it."
            )
        if fisher_loss is not None and not callable(fisher_loss):
            raise ConfigError(f"`fisher_loss` must be a function (module, batch) -> loss, got {fisher_loss!r} (ModelMerging).")
        self.fisher_batches = (
            check_fisher_batches(fisher_batches, "ModelMerging") if fisher_batches is not None else DEFAULT_FISHER_BATCHES
        ) if self._requires_fisher else None
        self.fisher_loss = fisher_loss
        self._fisher_cache: tuple[tuple[int, int], dict[str, Tensor]] | None = None
        self.validate_scale = validate_scale
        self.scale_grid = scale_grid_for(self.core.merger.default_scale, grid) if validate_scale else None
        self.scale_log: list[dict[str, Any]] = []
        self.method = method
        self.method_options = options
        self.start_from = start_from
        self.exclude = exclude
        self.statistics = statistics
        self.snapshot_device = device
        if base_weights is not None and not isinstance(base_weights, (Mapping, str, os.PathLike)):
            raise ConfigError(
                f"`base_weights` must be a state dict or a .safetensors path, got {type(base_weights).__name__}."
            )
        if isinstance(base_weights, (str, os.PathLike)):
            load_base_weights(base_weights)  # fail now on a missing or pickled file
        self._base_weights_source = base_weights
        self.reset_optimizer = check_bool(reset_optimizer, "reset_optimizer", "ModelMerging")
        if check_ranks is None:
            check_ranks = os.environ.get("CL_PLUGIN_DEBUG", "0") == "1"
        self.check_ranks = bool(check_ranks)
        self.verbose = bool(verbose)
        # The fine-tuned weights the next experience continues from (start_from="finetuned",
        # one fit per experience). Kept until that experience is folded, so a fit that
        # diverges can be retried from exactly where it started.
        self._kept_weights: dict[str, Tensor] | None = None
        self._holds_merged = False
        self.boundary_log: list[dict[str, float]] = []

    @property
    def merger(self):
        """The streaming merger; ``merger.num_tasks`` experiences are folded."""
        return self.core.merger

    @property
    def scale(self) -> float:
        """λ in θ₀ + λ·merged (with ``scale="validate"``, the last λ chosen, or the method's default before)."""
        return self.core.scale

    @property
    def _names(self) -> list[str] | None:
        return self.core.names

    def _options(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_options": self.method_options,
            "start_from": self.start_from,
            "exclude": list(self.exclude),
            "statistics": self.statistics,
            "scale": VALIDATE if self.validate_scale else self.scale,
            "scale_grid": None if self.scale_grid is None else list(self.scale_grid),
            "fisher_batches": self.fisher_batches,
        }

    def _saved_options(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        saved = state_dict.get("scale")
        if "scale" in state_dict and (saved == VALIDATE) != self.validate_scale:
            now = VALIDATE if self.validate_scale else self.scale
            raise ConfigError(
                f"The checkpoint's ModelMerging was written with scale={saved!r}, this run has scale={now!r}: a λ "
                "chosen on validation data at every boundary and a fixed λ do not mix in one stream. Resume with "
                f"scale={saved!r}, or start a new stream without `ckpt_path`."
            )
        return state_dict

    def _starts_a_new_stream(self) -> bool:
        # θ₀ given by the user: a new stream on purpose, whoever merged this module before.
        return self._base_weights_source is not None

    def _second_instance_message(self, same) -> str:
        methods = [getattr(cb, "method", "?") for cb in same]
        return (
            f"The Trainer has {len(same)} ModelMerging callbacks ({methods}). Each would fold the weights the "
            "other wrote at a boundary as if they were fine-tuned ones. Keep one ModelMerging and evaluate the "
            f"other methods from the same run with ContinualEvaluation(compare={methods[1:]!r})."
        )

    # -- public helpers ----------------------------------------------------------------
    @property
    def base_weights(self) -> dict[str, Tensor] | None:
        """θ₀ over the merged tensors (on ``snapshot_device``), once known."""
        return self.core.theta0

    def merged_state_dict(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The module's state dict with every merged entry set to θ₀ + scale·merged.

        Entries that are not merged (integer buffers, ``exclude``) are the
        module's current ones; the names of a tied tensor all hold the merged
        value; normalisation statistics are merged as ``statistics`` says.

        Under DDP or FSDP2 every rank must call it (the merge is sharded: the
        tensors are gathered), and every rank gets whole tensors.

        Raises:
            ConfigError: no experience has been folded yet.
        """
        out = dict(pl_module.state_dict())
        for n, t in self.core.whole(self.core.merged_tensors()).items():
            out[n] = t.to(device=out[n].device if not is_dtensor(out[n]) else t.device, dtype=out[n].dtype)
        for alias, n in self.core.aliases.items():
            out[alias] = out[n]
        return out

    @contextlib.contextmanager
    def merged_weights(self, pl_module: LightningModule) -> Iterator[LightningModule]:
        """Evaluate the merged weights inside the block; the weights before it come back after.

        Example::

            with merging.merged_weights(model):
                trainer.test(model, datamodule=dm)
        """
        merged = self.core.merged_tensors()
        saved = self.core.snapshot(pl_module)
        self.core.write(pl_module, merged)
        try:
            yield pl_module
        finally:
            self.core.write(pl_module, saved)

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        check_snapshot_device(self.snapshot_device, "ModelMerging")
        if self._requires_fisher:
            check_fisher_loss_source(pl_module, self.fisher_loss, "ModelMerging('fisher')")
        if self.validate_scale:
            validation_loaders(trainer, "ModelMerging")  # refuse now, not after the first experience
        # A callback that shares θ₀'s slices (ContinualEvaluation) needs the even split its own cores use.
        if any(getattr(cb, "shares_model_merging_theta0", False) for cb in trainer.callbacks):
            self.core.whole_matrices = False
        self._bind(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # FSDP2 (ModelParallelStrategy) shards the parameters in `configure_model`, after
        # `setup`: take each rank's slices again, now that the strategy has wrapped the
        # model (a sharded checkpoint is restored after this hook).
        if any(is_dtensor(p) for p in pl_module.parameters()):
            if self._requires_fisher:
                refuse_fisher_on_dtensors(pl_module, "ModelMerging")
            self._bind(trainer, pl_module)

    def _bind(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Choose the tensors and this rank's slices of them; check θ₀ (or ``base_weights``) against the model."""
        self.core.bind(pl_module, shard=merge_shard(trainer))
        state = pl_module.state_dict()
        self._layout = {n: (tuple(state[n].shape), state[n].dtype) for n in self.core.all_names}
        if self.core.theta0 is not None:
            # A reshaped or re-typed parameter would only surface at the next boundary,
            # after a whole experience of training: catch it before the first step.
            model = {n: self.core.local(state[n], n) for n in self.core.all_names}
            self._check_theta0(self.core.theta0, "θ₀ (from the earlier experiences)", model)
        elif self._base_weights_source is not None:
            # Checked whole now; cut to this rank's slices when training starts (after any sharding).
            base = load_base_weights(self._base_weights_source)
            check_base_weights(base, pl_module, self.core.all_names)
            whole = {n: state[n].full_tensor() if is_dtensor(state[n]) else state[n] for n in self.core.all_names}
            self._check_theta0({n: base[n] for n in self.core.all_names}, "θ₀ (`base_weights`)", whole)

    def _check_theta0(self, theta0: Mapping[str, Tensor], what: str, model: Mapping[str, Tensor]) -> None:
        """Raise unless θ₀ has the ``model``'s names, shapes and dtypes and holds finite values."""
        try:
            check_same_layout(theta0, model, f"ModelMerging: the model against {what}")
        except DtypeMismatchError as exc:
            raise DtypeMismatchError(
                f"{exc} θ₀ must be in the model's dtypes: pass `base_weights` in them, or keep the model's dtype "
                "the same for the whole stream."
            ) from None
        for n, t in theta0.items():
            if not is_finite(t):
                raise NonFiniteError(
                    f"ModelMerging: {what} tensor {n!r} holds NaN or infinite values; every task vector would be "
                    "NaN. Check the weights the stream starts from."
                )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.core.theta0 is None and self._base_weights_source is not None:
            base = load_base_weights(self._base_weights_source)
            self.core.theta0 = {n: self.core.local(base[n], n).to(self.snapshot_device, copy=True) for n in self.core.all_names}
        elif self.core.theta0 is None:
            # θ₀ may already have come back from a checkpoint (load_state_dict
            # runs before this hook); only a fresh run captures it.
            self.core.capture_theta0(pl_module, "ModelMerging: θ₀ (the weights when training starts)")
        if self._holds_merged:
            # The module holds θ₀ + scale·merged from the previous fit's end.
            self._install_start_weights(pl_module)
            self._holds_merged = False

    def _resumed_without_state(self, trainer: Trainer) -> None:
        if self._base_weights_source is None:
            raise CheckpointError(
                f"The checkpoint {trainer.ckpt_path!r} (written at step {trainer.global_step}) holds no ModelMerging "
                "state: it was written by a run without ModelMerging, or with weights only. θ₀ and the experiences "
                "it finished are not in it, and taking θ₀ from the resumed weights would silently drop them. Start "
                "the stream from its beginning with ModelMerging, or pass `base_weights=` (the weights the stream "
                "started from) to fold everything learnt since θ₀ at the next boundary."
            )
        rank_zero_info(
            f"ModelMerging: the checkpoint {trainer.ckpt_path!r} holds no ModelMerging state; θ₀ is `base_weights`, "
            "and the next boundary folds everything learnt since θ₀ as one task vector."
        )

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int) -> None:
        if self.reset_optimizer and self.merger.num_tasks > 0:
            reset_optimizer_state(trainer)

    def on_experience_end(
        self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool
    ) -> None:
        start = time.perf_counter()
        self.core.check_unchanged(pl_module, f"during experience {experience}")
        keep_current = at_fit_end and self.start_from == "finetuned"
        if self.core.folds_in_place:
            # τ formed chunk by chunk inside the fold: no buffer the size of the model.
            kept = self.core.snapshot(pl_module) if keep_current else None
            try:
                task_norm = self.core.fold_in_place(pl_module)  # over the whole model (a collective when sharded)
            except DivergedError:
                self.on_experience_diverged(trainer, pl_module, experience, at_fit_end)
        else:
            try:
                task_vector = self.core.task_vector(pl_module, trusted=True)  # folded below, never handed out
            except DivergedError:
                self.on_experience_diverged(trainer, pl_module, experience, at_fit_end)
            fisher = self.experience_fisher(trainer, pl_module, experience, at_fit_end) if self._requires_fisher else None
            kept = self.core.snapshot(pl_module) if keep_current else None
            self.core.fold(task_vector, fisher=fisher)
            self._fisher_cache = None
            del fisher
            task_norm = self.core.norm(task_vector)  # over the whole model (a collective when sharded)
            del task_vector
        if self.validate_scale:
            # The grid is tried in the module; the fine-tuned weights the next experience
            # continues from are put back (at fit end `kept` holds them, and otherwise
            # `_install_start_weights` writes θ₀ or the merge over whatever is there).
            restore = self.core.snapshot(pl_module) if self.start_from == "finetuned" and not at_fit_end else None
            self._choose_scale(trainer, pl_module, experience)
            if restore is not None:
                self.core.write(pl_module, restore)
            del restore
        elapsed = time.perf_counter() - start
        norm = self.core.merged_norm()  # over the whole model (a collective when sharded)
        record = {
            "experience": experience,
            "merge_time_s": elapsed,
            "merged_norm": norm,
            "task_vector_norm": task_norm,
        }
        if self.validate_scale:
            record["scale"] = self.scale
        self.boundary_log.append(record)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"cl/{self.method}/{k}": v for k, v in record.items() if k != "experience"}, step=trainer.global_step
            )
        if self.verbose:
            rank_zero_info(
                f"ModelMerging({self.method}): folded experience {experience} in {elapsed:.3f} s, "
                f"|merged| = {norm:.4f} ({self.merger.num_tasks} experiences)"
            )
        # The experience is folded: the weights kept for a retry of it are no longer needed.
        self._kept_weights = kept
        if at_fit_end:
            self._hand_back_merged(pl_module, kept_is_set=True)
        elif self.start_from != "finetuned":
            try:
                self._install_start_weights(pl_module)
            except NonFiniteError:
                self._experiences_finished += 1  # the fold is done and stays counted: a retry must not fold it twice
                raise
        if self.check_ranks:
            check_ranks_agree(trainer, pl_module, "ModelMerging", names=self.core.all_names)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # the last boundary
        self._finish_fit(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending = self._training_experience is not None and trainer.state.fn == "fit"
        super().on_fit_end(trainer, pl_module)
        if pending:
            self._finish_fit(trainer, pl_module)

    def _finish_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """At the end of ``fit``: the module and the last checkpoints hold the merge of what was folded."""
        if not self.merger.num_tasks:
            return
        if not self._holds_merged:
            # The last experience was skipped (nothing trained): the module still holds
            # training weights. Hand back the merge of what was folded all the same.
            self._hand_back_merged(pl_module, kept_is_set=False)
        refresh_last_checkpoints(trainer, "ModelMerging")

    # -- internals -------------------------------------------------------------------------------
    def _hand_back_merged(self, pl_module: LightningModule, *, kept_is_set: bool) -> None:
        """Write θ₀ + scale·merged into the module; keep what the next fit starts from."""
        if not kept_is_set:
            self._kept_weights = (
                self.core.snapshot(pl_module) if self.start_from == "finetuned" else None
            )
        try:
            self.core.write_merged(pl_module)
        except NonFiniteError:
            if kept_is_set:
                self._experiences_finished += 1  # the fold is done and stays counted: a retry must not fold it twice
            raise
        self._holds_merged = True

    def _install_start_weights(self, pl_module: LightningModule) -> None:
        """Set the weights the next experience trains from, as ``start_from`` says."""
        if self.start_from == "finetuned":
            if self._holds_merged:
                self.core.write(pl_module, self._kept_weights)
            # otherwise the module already holds the fine-tuned weights
        elif self.start_from == "pretrained":
            self.core.write(pl_module, self.core.theta0)
        else:
            self.core.write_merged(pl_module)

    def experience_fisher(
        self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool
    ) -> dict[str, Tensor]:
        """The diagonal Fisher of ``experience`` over the merged tensors, as this callback folds it (whole tensors).

        Computed once per boundary: ``ContinualEvaluation`` (which runs first)
        asks for it to fold its own ``"fisher"`` merge, and the fold here reuses it.
        """
        key = (experience, trainer.global_step)
        if self._fisher_cache is not None and self._fisher_cache[0] == key:
            return self._fisher_cache[1]
        fisher = experience_fisher(
            trainer,
            pl_module,
            self.core,
            experience,
            at_fit_end,
            n_batches=self.fisher_batches or DEFAULT_FISHER_BATCHES,
            loss=self.fisher_loss,
        )
        self._fisher_cache = (key, fisher)
        return fisher

    def evaluation_settings(self, trainer: Trainer) -> tuple[Callable, Callable, list[list[int]] | None]:
        """``(predict, target, classes)`` as the Trainer's ContinualEvaluation makes predictions, else the defaults."""
        from cl_plugin.callbacks._boundary_data import default_predict, default_target
        from cl_plugin.callbacks.evaluation import ContinualEvaluation

        evaluation = next((cb for cb in trainer.callbacks if isinstance(cb, ContinualEvaluation)), None)
        if evaluation is None:
            return default_predict, default_target, None
        return evaluation.predict, evaluation.target, (evaluation._classes if evaluation.task_aware else None)

    def _choose_scale(self, trainer: Trainer, pl_module: LightningModule, experience: int) -> None:
        """Set λ to the grid's best on the validation loaders of experiences 0..``experience``; log the choice."""
        loaders = validation_loaders(trainer, "ModelMerging")
        if len(loaders) <= experience:
            raise ConfigError(
                f"ModelMerging(scale='validate'): experience {experience} has no validation loader (the datamodule "
                f"gives {len(loaders)}); the validation stream needs one experience per training experience."
            )
        predict, target, classes = self.evaluation_settings(trainer)
        value, scores = choose_scale(
            self.core, trainer, pl_module, loaders[: experience + 1], self.scale_grid, predict, target,
            None if classes is None else classes[: experience + 1],
        )
        self.core.scale = value
        self.scale_log.append(
            {"experience": experience, "scale": value, "grid": list(self.scale_grid), "validation_accuracy": scores}
        )
        if self.verbose:
            rank_zero_info(
                f"ModelMerging({self.method}): λ = {value:g} chosen on the validation data of experiences "
                f"0..{experience} (accuracy {max(s for s in scores if s == s):.4f})"
            )

    def on_experience_diverged(self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool) -> None:
        """The weights after ``experience`` are not finite: put the module back as it was, then raise."""
        state = pl_module.state_dict()
        bad = [n for n in self.core.all_names if not is_finite(self.core.local(state[n], n))]
        if self.merger.num_tasks:
            self.core.write_merged(pl_module)
            restored = f"θ₀ + {self.scale}·merged of the {self.merger.num_tasks} experience(s) folded so far"
            self._holds_merged = True
            retry_ready = self.start_from != "finetuned" or self._kept_weights is not None
        else:
            self.core.write(pl_module, self.core.theta0)
            restored = "θ₀"
            retry_ready = True
        if at_fit_end and retry_ready:
            how = (
                "Call `trainer.fit` again for this experience after changing what made it diverge (a lower learning "
                "rate, gradient clipping, another precision): it starts from the same weights as the failed one."
            )
        else:
            how = (
                f"Resume from the last checkpoint written before experience {experience} "
                "(`trainer.fit(..., ckpt_path=...)`) after changing what made it diverge (a lower learning rate, "
                "gradient clipping, another precision)."
            )
        raise NonFiniteError(
            f"ModelMerging: training diverged in experience {experience}: the weights hold NaN or infinite values "
            f"in {len(bad)} tensor(s) ({', '.join(repr(n) for n in bad[:3])}{' ...' if len(bad) > 3 else ''}), so "
            f"there is no task vector to fold. The merge is unchanged ({self.merger.num_tasks} experience(s) "
            f"folded) and the module holds {restored} again. {how}"
        )

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.core.state_dict(keep_sharded=self._keep_sharded))
        kept = self._kept_weights if self._holds_merged else None
        state.update(
            # Only what the next fit needs: the weights kept for a retry while an
            # experience trains stay out of the checkpoint (resume it instead).
            kept_weights=None if kept is None else self.core.export(kept, keep_sharded=self._keep_sharded),
            holds_merged=self._holds_merged,
            # With scale="validate": the λ chosen at the last boundary, and every choice so far.
            chosen_scale=self.scale if self.validate_scale else None,
            scale_log=[dict(r) for r in self.scale_log],
        )
        return state

    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner = "ModelMerging"
        finished = state.get("experiences_finished", 0)
        training = state.get("training_experience")
        layout = getattr(self, "_layout", None)
        base = None if self._base_weights_source is None else load_base_weights(self._base_weights_source)
        apply_core = self.core.prepare_load(state, owner, layout=layout, base_weights=base)
        if state["theta0"] is None and (finished or training is not None):
            raise CheckpointError(
                f"The checkpoint's ModelMerging state has no θ₀ but records {finished} finished experience(s); "
                "it is damaged. Resume from another checkpoint."
            )
        merger_state = state["merger"] or {}
        if merger_state.get("num_tasks", 0) != finished:
            raise CheckpointError(
                f"The checkpoint's ModelMerging state records {finished} finished experience(s) but its merger holds "
                f"{merger_state.get('num_tasks', 0)}; it is damaged. Resume from another checkpoint."
            )
        holds_merged = check_bool_field(state.get("holds_merged", False), "holds_merged", owner)
        if holds_merged and not finished:
            raise CheckpointError("The checkpoint's ModelMerging state says the module holds a merge of no experience; it is damaged.")
        kept = state.get("kept_weights")
        if kept is not None:
            names = (state["names"] or []) + list(state.get("statistic_names", []))
            kept = check_tensor_dict(kept, "kept_weights", owner, layout, names=names, device=self.snapshot_device)
            kept = {n: self.core.from_checkpoint(n, t, f"kept_weights[{n!r}]", owner) for n, t in kept.items()}
        if holds_merged and self.start_from == "finetuned" and kept is None:
            raise CheckpointError(
                "The checkpoint's ModelMerging (start_from='finetuned') holds the merged model but not the "
                "fine-tuned weights the next experience continues from; it is damaged."
            )
        chosen, scale_log = _check_scale_state(state, finished, self.validate_scale)

        def apply() -> None:
            apply_core()
            self._kept_weights = kept
            self._holds_merged = holds_merged
            if chosen is not None:
                self.core.scale = chosen
            self.scale_log = scale_log

        return apply


def _check_scale_state(state: Mapping[str, Any], finished: int, validate: bool) -> tuple[float | None, list[dict[str, Any]]]:
    """The checkpoint's chosen λ and scale log (``scale="validate"``), checked; (None, []) otherwise."""
    owner = "ModelMerging"
    scale_log = state.get("scale_log", [])
    if not isinstance(scale_log, list) or not all(isinstance(r, Mapping) and "scale" in r for r in scale_log):
        raise CheckpointError(f"The checkpoint's {owner} scale_log is not a list of records; it is damaged.")
    chosen = state.get("chosen_scale")
    if not validate:
        return None, [dict(r) for r in scale_log]
    if finished and chosen is None:
        raise CheckpointError(
            f"The checkpoint's {owner} (scale='validate') records {finished} finished experience(s) but no chosen λ; "
            "it is damaged."
        )
    if chosen is not None:
        chosen = check_scale(chosen, f"the checkpoint's {owner} chosen_scale")
    return chosen, [dict(r) for r in scale_log]


def refresh_last_checkpoints(trainer: Trainer, owner: str) -> None:
    """Write the module's merged weights over the checkpoints saved at this step that ``ckpt_path="last"`` loads.

    Those are each ``ModelCheckpoint``'s ``last_model_path`` and, for one
    without a ``monitor`` (whose "best" is simply the latest), its
    ``best_model_path``. A monitored best checkpoint holds one epoch's
    training weights; it is left as it is, with a warning.
    """
    paths, monitored = set(), []
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "last_model_path", ""):
            paths.add(cb.last_model_path)
        if getattr(cb, "monitor", None) is None and getattr(cb, "best_model_path", ""):
            paths.add(cb.best_model_path)
        elif getattr(cb, "best_model_path", ""):
            monitored.append(cb.monitor)
    # Rank 0 decides (the files may be visible to it only); every rank takes part in the save.
    stale = [p for p in sorted(paths) if os.path.exists(p) and _checkpoint_step(p) == trainer.global_step]
    for path in trainer.strategy.broadcast(stale, src=0):
        trainer.save_checkpoint(path)
    if monitored:
        rank_zero_warn(
            f"{owner}: ModelCheckpoint(monitor={monitored[0]!r}) keeps the epochs with the best {monitored[0]!r}: "
            "those checkpoints hold one epoch's training weights, not the merged model. The merged model is in the "
            "module and in the `last` checkpoint (ModelCheckpoint(save_last=True)); load that one "
            "(`trainer.test(ckpt_path='last')`)."
        )


def _checkpoint_step(path: str) -> int | None:
    try:
        if os.path.isdir(path):  # a distributed checkpoint: its metadata file holds the step
            path = os.path.join(path, "meta.pt")
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("global_step", -1))
    except Exception:  # noqa: BLE001 - an unreadable file is simply not refreshed
        return None
