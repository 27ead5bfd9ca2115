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
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cl_plugin._checks import check_bool, check_same_layout, check_scale, is_finite
from cl_plugin.errors import CheckpointError, ConfigError, DtypeMismatchError, NonFiniteError, did_you_mean
from cl_plugin.merging import MERGERS, get_merger
from cl_plugin.task_vectors import TaskVector
from cl_plugin.callbacks._boundaries import (
    TaskBoundaryCallback,
    check_base_weights,
    floating_names,
    load_base_weights,
    reset_optimizer_state,
    snapshot,
    tied_names,
    write_into,
)
from cl_plugin.callbacks._checkpoint import (
    Layout,
    check_bool_field,
    check_tensor_dict,
    layout_of,
    read,
)

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
        if self.snapshot_device.type == "meta":
            raise ConfigError(
                "`snapshot_device='meta'` holds no values, so θ₀ and the merge could not be kept (ModelMerging). "
                "Use 'cpu' (the default) or an accelerator device."
            )
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
        self._aliases: dict[str, str] = {}
        self._float_names: list[str] | None = None
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._theta0: dict[str, Tensor] | None = None
        # The fine-tuned weights the next experience continues from (start_from="finetuned",
        # one fit per experience). Kept until that experience is folded, so a fit that
        # diverges can be retried from exactly where it started.
        self._kept_weights: dict[str, Tensor] | None = None
        self._holds_merged = False
        self.boundary_log: list[dict[str, float]] = []

    def _options(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_options": self.method_options,
            "start_from": self.start_from,
            "exclude": list(self.exclude),
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
        """θ₀ over the merged names (on ``snapshot_device``), once known."""
        return self._theta0

    def merged_state_dict(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The module's state dict with every merged entry set to θ₀ + scale·merged.

        Entries that are not merged (integer buffers, ``exclude``) are the
        module's current ones; the names of a tied tensor all hold the merged value.

        Raises:
            ConfigError: no experience has been folded yet.
        """
        self._require_merged()
        out = dict(pl_module.state_dict())
        for n, t in self._merged_tensors().items():
            out[n] = t.to(device=out[n].device, dtype=out[n].dtype)
        for alias, n in self._aliases.items():
            out[alias] = out[n]
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
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        check_snapshot_device(self.snapshot_device, "ModelMerging")
        names = floating_names(pl_module, self.exclude)
        if self._names is not None and names != self._names:
            added = [n for n in names if n not in self._names]
            removed = [n for n in self._names if n not in names]
            raise ConfigError(
                f"The model's floating-point tensors changed since the first experience (added {added[:5]}, "
                f"removed {removed[:5]}). Task vectors need one architecture for the whole stream."
            )
        state = pl_module.state_dict()
        self._names = names
        self._aliases = tied_names(pl_module, names)
        self._float_names = [n for n, t in state.items() if t.is_floating_point()]
        merged = {n: state[n] for n in names}
        self._layout = layout_of(merged)
        if self._theta0 is not None:
            # A reshaped or re-typed parameter would only surface at the next boundary,
            # after a whole experience of training: catch it before the first step.
            self._check_theta0(self._theta0, "θ₀ (from the earlier experiences)", merged)
        if self._theta0 is None and self._base_weights_source is not None:
            base = load_base_weights(self._base_weights_source)
            check_base_weights(base, pl_module, names)
            theta0 = {n: base[n].detach().to(self.snapshot_device, copy=True) for n in names}
            self._check_theta0(theta0, "θ₀ (`base_weights`)", merged)
            self._theta0 = theta0

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
        if self._theta0 is None:
            # θ₀ may already have come back from a checkpoint (load_state_dict
            # runs before this hook); only a fresh run captures it.
            theta0 = snapshot(pl_module, self._names, self.snapshot_device)
            for n, t in theta0.items():
                if not is_finite(t):
                    raise NonFiniteError(
                        f"ModelMerging: θ₀ (the weights when training starts) tensor {n!r} holds NaN or infinite "
                        "values; every task vector would be NaN. Check the weights the stream starts from."
                    )
            self._theta0 = theta0
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
        self._check_tensors_unchanged(pl_module, experience)
        current = snapshot(pl_module, self._names, self.snapshot_device)
        try:
            task_vector = TaskVector.between(current, self._theta0)
        except NonFiniteError:
            self._diverged(pl_module, experience, current, at_fit_end)
        keep_current = at_fit_end and self.start_from == "finetuned"
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
        # The experience is folded: the weights kept for a retry of it are no longer needed.
        self._kept_weights = current if keep_current else None
        try:
            merged = self._merged_tensors() if at_fit_end or self.start_from == "merged" else None
        except NonFiniteError:
            # The fold is done and stays counted, so a retry does not fold it twice.
            self._experiences_finished += 1
            self._holds_merged = False
            raise
        if at_fit_end:
            # Hand the merged model back; keep the training weights if the next fit continues from them.
            write_into(pl_module, merged)
            self._holds_merged = True
        else:
            self._install_start_weights(pl_module, merged)
        if self.check_ranks:
            self._check_ranks_agree(trainer, pl_module)

    # -- internals -------------------------------------------------------------------------------
    def _require_merged(self) -> None:
        if self._theta0 is None or self.merger.num_tasks == 0:
            raise ConfigError("No experience has been merged yet: train at least one experience first.")

    def _merged_tensors(self) -> dict[str, Tensor]:
        """θ₀ + scale·merged over the merged names (on ``snapshot_device``), checked finite before anyone writes them."""
        merged = self.merger.merged().apply_to(self._theta0, self.scale)
        for n, t in merged.items():
            if not is_finite(t):
                raise NonFiniteError(
                    f"ModelMerging: θ₀ + {self.scale}·merged overflows {t.dtype} in tensor {n!r}; the module keeps "
                    "the weights it has. Resume with a smaller `scale`, or train in a wider dtype."
                )
        return merged

    def _install_start_weights(self, pl_module: LightningModule, merged: Mapping[str, Tensor] | None = None) -> None:
        """Set the weights the next experience trains from, as ``start_from`` says."""
        if self.start_from == "finetuned":
            if self._holds_merged:
                write_into(pl_module, self._kept_weights)
            # otherwise the module already holds the fine-tuned weights
        elif self.start_from == "pretrained":
            write_into(pl_module, self._theta0)
        else:
            write_into(pl_module, self._merged_tensors() if merged is None else merged)

    def _check_tensors_unchanged(self, pl_module: LightningModule, experience: int) -> None:
        """Raise before folding if a floating-point tensor was added or removed during the experience."""
        now = [n for n, t in pl_module.state_dict().items() if t.is_floating_point()]
        if now != self._float_names:
            added = [n for n in now if n not in self._float_names]
            removed = [n for n in self._float_names if n not in now]
            raise ConfigError(
                f"ModelMerging: the model's floating-point tensors changed during experience {experience} "
                f"(added {added[:5]}, removed {removed[:5]}); nothing was folded. A task vector needs the tensors "
                "θ₀ was taken from: create every parameter and buffer before `fit` (e.g. in `__init__` or "
                "`configure_model`), and keep them for the whole stream."
            )

    def on_experience_diverged(self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool) -> None:
        state = pl_module.state_dict()
        self._diverged(pl_module, experience, {n: state[n] for n in self._names}, at_fit_end)

    def _diverged(self, pl_module: LightningModule, experience: int, weights: Mapping[str, Tensor], at_fit_end: bool):
        """The ``weights`` after ``experience`` are not finite: put the module back as it was, then raise."""
        bad = [n for n, t in weights.items() if not is_finite(t)]
        if self.merger.num_tasks:
            write_into(pl_module, self._merged_tensors())
            restored = f"θ₀ + {self.scale}·merged of the {self.merger.num_tasks} experience(s) folded so far"
            self._holds_merged = True
            retry_ready = self.start_from != "finetuned" or self._kept_weights is not None
        else:
            write_into(pl_module, self._theta0)
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
            names=list(self._names) if self._names is not None else None,
            theta0=self._theta0,
            merger=self.merger.state_dict(),
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
        names = read(state, "names", owner)
        if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
            raise CheckpointError(f"The checkpoint's {owner} state has names={names!r}; expected a list of tensor names.")
        if names is not None and self._names is not None and list(names) != self._names:
            added = [n for n in self._names if n not in names]
            removed = [n for n in names if n not in self._names]
            raise CheckpointError(
                f"The checkpoint's ModelMerging merged other tensors than this model has (the model adds "
                f"{added[:5]}, lacks {removed[:5]}). Resume with the model and `exclude` the checkpoint was written with."
            )
        names = None if names is None else list(names)
        layout: Layout | None = self._layout if self._layout is not None else None
        theta0 = read(state, "theta0", owner)
        if theta0 is None:
            if finished or training is not None:
                raise CheckpointError(
                    f"The checkpoint's ModelMerging state has no θ₀ but records {finished} finished experience(s); "
                    "it is damaged. Resume from another checkpoint."
                )
        else:
            theta0 = check_tensor_dict(theta0, "theta0", owner, layout, names=names, device=self.snapshot_device)
            layout = layout_of(theta0)
        merger = get_merger(self.method, **self.method_options)
        merger_state = read(state, "merger", owner)
        if merger_state is not None:
            merger.load_state_dict(merger_state)  # validates it completely; `merger` is a new object
        if merger.num_tasks != finished:
            raise CheckpointError(
                f"The checkpoint's ModelMerging state records {finished} finished experience(s) but its merger holds "
                f"{merger.num_tasks}; it is damaged. Resume from another checkpoint."
            )
        if merger.num_tasks and (layout is None or sorted(merger.state_dict()["input_dtypes"]) != sorted(layout)):
            raise CheckpointError("The checkpoint's ModelMerging merger holds other tensors than its θ₀; it is damaged.")
        holds_merged = check_bool_field(state.get("holds_merged", False), "holds_merged", owner)
        if holds_merged and not merger.num_tasks:
            raise CheckpointError("The checkpoint's ModelMerging state says the module holds a merge of no experience; it is damaged.")
        kept = state.get("kept_weights")
        if kept is not None:
            kept = check_tensor_dict(kept, "kept_weights", owner, layout, device=self.snapshot_device)
        if holds_merged and self.start_from == "finetuned" and kept is None:
            raise CheckpointError(
                "The checkpoint's ModelMerging (start_from='finetuned') holds the merged model but not the "
                "fine-tuned weights the next experience continues from; it is damaged."
            )
        if theta0 is not None and self._base_weights_source is not None:
            base = load_base_weights(self._base_weights_source)
            differ = [n for n in theta0 if n not in base or not torch.equal(base[n].to(theta0[n]), theta0[n])]
            if differ:
                raise ConfigError(
                    f"`base_weights` differs from the checkpoint's θ₀ in {len(differ)} tensor(s) "
                    f"({', '.join(repr(n) for n in differ[:3])}). Resume without `base_weights` (the checkpoint "
                    "holds θ₀), or start a new stream."
                )

        def apply() -> None:
            self.merger = merger
            self._theta0 = theta0
            self._kept_weights = kept
            self._holds_merged = holds_merged
            if names is not None:
                self._names = names

        return apply
