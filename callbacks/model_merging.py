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
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cl_plugin._checks import check_bool, check_same_layout, check_scale
from cl_plugin.errors import ConfigError, did_you_mean
from cl_plugin.merging import MERGERS, get_merger
from cl_plugin.task_vectors import TaskVector
from cl_plugin.callbacks._boundaries import (
    TaskBoundaryCallback,
    check_base_weights,
    floating_names,
    load_base_weights,
    reset_optimizer_state,
    snapshot,
    write_into,
)

__all__ = ["ModelMerging"]

START_FROM = ("finetuned", "pretrained", "merged")
STATE_FORMAT_VERSION = 1


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
        base_weights: θ₀ as a state dict or a ``.safetensors`` path; default:
            the model's weights when training starts.
        reset_optimizer: clear the optimizers' state (momentum, Adam moments)
            at every boundary (default True), so a reset to θ₀ carries no stale
            momentum. Learning-rate schedulers are not reset.
        check_ranks: under DDP, compare a checksum of the weights across
            ranks after every boundary and raise if they differ (a debugging
            aid; costs one all-gather per boundary). Default: on when the
            environment variable ``CL_PLUGIN_DEBUG=1``.
        verbose: print a line per boundary on rank 0 (default False).
        **method_options: passed to the merger, e.g. ``alpha=0.5`` for OPCM,
            ``top_k=0.2`` for TIES, ``seed=0`` for random.

    Raises:
        ConfigError: unknown method or option, ``scale`` out of range, unknown
            ``start_from``, bad ``exclude`` or ``snapshot_device``.

    Attributes:
        merger: the streaming merger; ``merger.num_tasks`` experiences are folded.
    """

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
        **method_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(method, str) or method not in MERGERS:
            raise ConfigError(
                f"Unknown merging method {method!r} (ModelMerging). Choose one of {sorted(MERGERS)}."
                + did_you_mean(str(method), MERGERS)
            )
        self.merger = get_merger(method, **method_options)
        self.method = method
        self.method_options = dict(method_options)
        self.scale = self.merger.default_scale if scale is None else check_scale(scale, f"ModelMerging(method={method!r})")
        if start_from not in START_FROM:
            raise ConfigError(
                f"`start_from` must be one of {list(START_FROM)}, got {start_from!r} (ModelMerging)."
                + did_you_mean(str(start_from), START_FROM)
            )
        self.start_from = start_from
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.exclude = tuple(exclude)
        if not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError(f"`exclude` must be glob patterns (strings), got {exclude!r} (ModelMerging).")
        try:
            self.snapshot_device = torch.device(snapshot_device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"`snapshot_device` {snapshot_device!r} is not a torch device: {exc}.") from None
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

        self._names: list[str] | None = None
        self._theta0: dict[str, Tensor] | None = None
        self._kept_weights: dict[str, Tensor] | None = None
        self._holds_merged = False
        self.boundary_log: list[dict[str, float]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, start_from=self.start_from, scale=self.scale)

    # -- public helpers ----------------------------------------------------------------
    @property
    def base_weights(self) -> dict[str, Tensor] | None:
        """θ₀ over the merged names (on ``snapshot_device``), once known."""
        return self._theta0

    def merged_state_dict(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The module's state dict with every merged entry set to θ₀ + scale·merged.

        Entries that are not merged (integer buffers, ``exclude``) are the
        module's current ones.

        Raises:
            ConfigError: no experience has been folded yet.
        """
        self._require_merged()
        out = dict(pl_module.state_dict())
        for n, t in self._merged_tensors().items():
            out[n] = t.to(device=out[n].device, dtype=out[n].dtype)
        return out

    @contextlib.contextmanager
    def merged_weights(self, pl_module: LightningModule) -> Iterator[LightningModule]:
        """Evaluate the merged weights inside the block; the weights before it come back after.

        Example::

            with merging.merged_weights(model):
                trainer.test(model, datamodule=dm)
        """
        self._require_merged()
        saved = snapshot(pl_module, self._names, self.snapshot_device)
        write_into(pl_module, self._merged_tensors())
        try:
            yield pl_module
        finally:
            write_into(pl_module, saved)

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = floating_names(pl_module, self.exclude)
        if self._names is not None and names != self._names:
            added = [n for n in names if n not in self._names]
            removed = [n for n in self._names if n not in names]
            raise ConfigError(
                f"The model's floating-point tensors changed since the first experience (added {added[:5]}, "
                f"removed {removed[:5]}). Task vectors need one architecture for the whole stream."
            )
        self._names = names
        if self._theta0 is not None:
            # A reshaped parameter would only surface at the next boundary, after
            # a whole experience of training: catch it before the first step.
            state = pl_module.state_dict()
            check_same_layout(
                self._theta0, {n: state[n] for n in names}, "ModelMerging: the model against θ₀", check_dtype=False
            )
        if self._theta0 is None and self._base_weights_source is not None:
            base = load_base_weights(self._base_weights_source)
            check_base_weights(base, pl_module, names)
            self._theta0 = {n: base[n].detach().to(self.snapshot_device, copy=True) for n in names}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._theta0 is None:
            # θ₀ may already have come back from a checkpoint (load_state_dict
            # runs before this hook); only a fresh run captures it.
            self._theta0 = snapshot(pl_module, self._names, self.snapshot_device)
        if self._holds_merged:
            # The module holds θ₀ + scale·merged from the previous fit's end.
            self._install_start_weights(pl_module)
            self._holds_merged = False

    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int) -> None:
        if self.reset_optimizer and self.merger.num_tasks > 0:
            reset_optimizer_state(trainer)

    def on_experience_end(
        self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool
    ) -> None:
        start = time.perf_counter()
        current = snapshot(pl_module, self._names, self.snapshot_device)
        keep_current = at_fit_end and self.start_from == "finetuned"
        task_vector = TaskVector.between(current, self._theta0)
        if not keep_current:
            del current  # the snapshot is not needed past τ: free it before the fold
        self.merger.update(task_vector)
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
        if at_fit_end:
            # Hand the merged model back; keep the training weights if the next
            # fit continues from them.
            self._kept_weights = current if keep_current else None
            write_into(pl_module, self._merged_tensors())
            self._holds_merged = True
        else:
            self._install_start_weights(pl_module)
        if self.check_ranks:
            self._check_ranks_agree(trainer, pl_module)

    # -- internals -------------------------------------------------------------------------------
    def _require_merged(self) -> None:
        if self._theta0 is None or self.merger.num_tasks == 0:
            raise ConfigError("No experience has been merged yet: train at least one experience first.")

    def _merged_tensors(self) -> dict[str, Tensor]:
        """θ₀ + scale·merged over the merged names (on ``snapshot_device``)."""
        return self.merger.merged().apply_to(self._theta0, self.scale)

    def _install_start_weights(self, pl_module: LightningModule) -> None:
        """Set the weights the next experience trains from, as ``start_from`` says."""
        if self.start_from == "finetuned":
            if self._holds_merged:
                write_into(pl_module, self._kept_weights)
            # otherwise the module already holds the fine-tuned weights
        elif self.start_from == "pretrained":
            write_into(pl_module, self._theta0)
        else:
            write_into(pl_module, self._merged_tensors())
        self._kept_weights = None

    def _check_ranks_agree(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size <= 1:
            return
        state = pl_module.state_dict()
        checksum = torch.stack(
            [state[n].detach().double().sum() for n in self._names] + [state[n].detach().double().abs().sum() for n in self._names]
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
        state.update(
            format_version=STATE_FORMAT_VERSION,
            method=self.method,
            method_options=self.method_options,
            scale=self.scale,
            start_from=self.start_from,
            names=list(self._names) if self._names is not None else None,
            theta0=self._theta0,
            merger=self.merger.state_dict(),
            kept_weights=self._kept_weights,
            holds_merged=self._holds_merged,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        method = state_dict.get("method", self.method)
        if method != self.method:
            raise ConfigError(
                f"The checkpoint's ModelMerging used method {method!r}, this one {self.method!r}; "
                "resume with the same method."
            )
        super().load_state_dict(state_dict)
        if state_dict.get("merger") is not None and state_dict["merger"].get("num_tasks", 0) > 0:
            self.merger.load_state_dict(state_dict["merger"])
        else:
            self.merger.reset()
        device = self.snapshot_device
        theta0 = state_dict.get("theta0")
        self._theta0 = None if theta0 is None else {n: t.to(device) for n, t in theta0.items()}
        kept = state_dict.get("kept_weights")
        self._kept_weights = None if kept is None else {n: t.to(device) for n, t in kept.items()}
        self._holds_merged = bool(state_dict.get("holds_merged", False))
        names = state_dict.get("names")
        if names is not None:
            self._names = list(names)
