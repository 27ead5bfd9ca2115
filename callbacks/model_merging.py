"""``ModelMerging``: fold a task vector into a merger at every task boundary.

At the end of each experience the callback takes τ = θ − θ₀ over the model's
floating-point tensors and folds it into a streaming merger from
:mod:`cl_plugin.merging` (MagMax by default: Marczak et al., ECCV 2024). When
``fit`` ends the module holds θ₀ + scale·merged; the next experience starts
from the weights ``start_from`` names.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from cl_plugin._checks import check_bool, check_same_layout, check_scale, is_finite
from cl_plugin.errors import CheckpointError, ConfigError, DtypeMismatchError, NonFiniteError, did_you_mean
from cl_plugin.merging.continual import ContinualMerge, check_exclude, is_dtensor, merge_method_options
from cl_plugin.task_vectors import TaskVector
from cl_plugin.callbacks._boundaries import (
    TaskBoundaryCallback,
    check_base_weights,
    load_base_weights,
    merge_shard,
    reset_optimizer_state,
)
from cl_plugin._checkpoint import check_bool_field, check_tensor_dict, layout_of

__all__ = ["ModelMerging"]

START_FROM = ("finetuned", "pretrained", "merged")


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
            method's own default (MagMax 0.5, OPCM 1.0, TIES 0.55, ...).
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
        method_options: the merger's options as one mapping, e.g.
            ``{"alpha": 0.5}`` for OPCM (the form a LightningCLI YAML file
            uses); the same as passing them as keywords.
        **method_options: passed to the merger, e.g. ``alpha=0.5`` for OPCM,
            ``top_k=0.2`` for TIES, ``seed=0`` for random.

    Raises:
        ConfigError: unknown method or option, ``scale`` out of range, unknown
            ``start_from``, bad ``exclude`` or ``snapshot_device``; at ``setup``:
            a second ``ModelMerging`` (or an adapter callback) in the Trainer,
            a strategy that spawns its processes, a ``snapshot_device`` this
            machine lacks; when resuming, a checkpoint written with another
            ``method``, ``method_options``, ``start_from`` or ``exclude``.
        CheckpointError: a damaged checkpoint state, one that does not fit the
            model, or a checkpoint of a run that trained without this callback.
        NonFiniteError: θ₀ holds NaN/inf; the weights diverged during an
            experience (the module is put back as it was before the
            experience, see docs/callbacks.md).

    Attributes:
        merger: the streaming merger; ``merger.num_tasks`` experiences are folded.

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
    #: ``scale`` is applied only when weights are written (and, with
    #: ``start_from="merged"``, when an experience starts), never folded into
    #: the merger's state: a resumed run may change it.
    _changeable_options = frozenset({"scale"})

    def __init__(
        self,
        method: str = "magmax",
        scale: float | None = None,
        start_from: str = "finetuned",
        exclude: Iterable[str] = (),
        snapshot_device: str | torch.device = "cpu",
        base_weights: Mapping[str, Tensor] | str | os.PathLike | None = None,
        reset_optimizer: bool = True,
        check_ranks: bool | None = None,
        verbose: bool = False,
        statistics: str = "average",
        method_options: Mapping[str, Any] | None = None,
        **more_method_options: Any,
    ) -> None:
        super().__init__()
        options = merge_method_options(method_options, more_method_options, "ModelMerging")
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
            method, scale=scale, exclude=exclude, statistics=statistics, device=device, method_options=options
        )
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
        """λ in θ₀ + λ·merged."""
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
            "scale": self.scale,
        }

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
        self._bind(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # FSDP2 (ModelParallelStrategy) shards the parameters in `configure_model`, after
        # `setup`: take each rank's slices again, now that the strategy has wrapped the
        # model (a sharded checkpoint is restored after this hook).
        if any(is_dtensor(p) for p in pl_module.parameters()):
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
        try:
            task_vector = self.core.task_vector(pl_module)
        except NonFiniteError:
            self.on_experience_diverged(trainer, pl_module, experience, at_fit_end)
        keep_current = at_fit_end and self.start_from == "finetuned"
        kept = self.core.snapshot(pl_module) if keep_current else None
        self.core.fold(task_vector)
        elapsed = time.perf_counter() - start
        norm = self.merger.merged_norm()
        task_norm = task_vector.norm()
        del task_vector
        record = {
            "experience": experience,
            "merge_time_s": elapsed,
            "merged_norm": norm,
            "task_vector_norm": task_norm,
        }
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
            self._check_ranks_agree(trainer, pl_module)

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

    def _check_ranks_agree(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size <= 1:
            return
        state = pl_module.state_dict()
        names = [n for n in self.core.all_names if not is_dtensor(state[n])]  # FSDP2 shards differ by design
        checksum = torch.stack(
            [state[n].detach().double().sum() for n in names] + [state[n].detach().double().abs().sum() for n in names]
        ).sum()
        gathered = trainer.strategy.all_gather(checksum.to(pl_module.device))
        if not torch.all(gathered == gathered.reshape(-1)[0]):
            raise RuntimeError(
                f"ModelMerging: the weights differ across ranks after a boundary (checksums {gathered.tolist()}). "
                "Every rank must fold the same task vectors; report this with your Trainer settings."
            )

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.core.state_dict())
        state.update(
            # Only what the next fit needs: the weights kept for a retry while an
            # experience trains stay out of the checkpoint (resume it instead).
            kept_weights=self._kept_weights if self._holds_merged else None,
            holds_merged=self._holds_merged,
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
        if holds_merged and self.start_from == "finetuned" and kept is None:
            raise CheckpointError(
                "The checkpoint's ModelMerging (start_from='finetuned') holds the merged model but not the "
                "fine-tuned weights the next experience continues from; it is damaged."
            )

        def apply() -> None:
            apply_core()
            self._kept_weights = kept
            self._holds_merged = holds_merged

        return apply


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
