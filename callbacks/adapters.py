"""``LoRAAdapters`` and ``SharedSubspaceAdapters``: adapters managed at task boundaries.

Both callbacks inject adapters into the LightningModule when ``fit`` sets up,
so that only the adapters and the modules named in ``trainable=`` train, and
act at every task boundary that :class:`TaskBoundaryCallback` finds (one
``fit`` over a :class:`~cl_plugin.benchmarks.ContinualDataModule`, or one
``fit`` per experience). The algorithms are those of :mod:`cl_plugin.adapters`;
the callbacks only decide when to call them.

:class:`LoRAAdapters`, ``mode="merge"``
    The adapter's ΔW = (alpha/r)·B A of every wrapped layer, plus the change of
    the ``trainable`` modules, is a task vector τ = θ − θ₀ over those weights
    (:func:`~cl_plugin.adapters.lora_delta`); it folds into a streaming merger
    of :mod:`cl_plugin.merging` (MagMax by default). The next experience
    starts from a fresh adapter (``start_from="fresh"``), from the same
    adapter (``"finetuned"``) or from the merged weights (``"merged"``).

    *Where the merged model lives.* When ``fit`` ends, the base weights of the
    wrapped layers (and the ``trainable`` modules) hold θ₀ + scale·merged,
    written exactly, and the adapter's B is zero, so its ΔW is zero. The
    module is therefore the merged model whatever adapter is active, its
    ``state_dict`` loads into any copy of the architecture (with or without
    adapters, e.g. after :func:`~cl_plugin.adapters.unload_lora`), and plain
    ``model(x)`` evaluates it. The trained adapter is kept aside in the
    callback when the next ``fit`` continues from it (``"finetuned"``).
    ``start_from="merged"`` likewise writes θ₀ + scale·merged into the base
    weights (exact) rather than a rank-r fit into the adapter.

:class:`LoRAAdapters`, ``mode="per_task"``
    One adapter per experience, named by the experience index: experience k
    trains adapter ``"k"``, which Avalanche's ``task_labels=True`` streams
    label ``k``. Earlier adapters are frozen and kept. At inference the task
    label picks the adapter: :meth:`LoRAAdapters.forward_by_task` (inputs and
    labels) or :meth:`LoRAAdapters.predict` (a batch ``(x, y, task_labels)``,
    usable as ``ContinualEvaluation(predict=...)``); inside your own code,
    ``with use_adapter(model, k): model(x)`` (the adapter only: with
    ``trainable_per_task=True`` use ``forward_by_task``, which also puts in
    the task's copy of the ``trainable`` modules). A label with no adapter (a
    task not trained yet) uses the base model.

``trainable_per_task=True`` (per-task LoRA and Share)
    One copy of the ``trainable`` modules (the head) per task, stored at each
    boundary, like PEFT's ``modules_to_save``. ``forward_by_task`` runs each
    label's samples with that task's copy through
    ``torch.func.functional_call``: nothing is written into the module, and
    the pass stays differentiable.

:class:`SharedSubspaceAdapters`
    Share (Kaushik et al., 2026, arXiv:2602.06043): the first experience
    trains a LoRA; at its end :meth:`SharedSubspace.inject` builds the shared
    basis from it (alpha/r folded into B) and stores it as the first task;
    every later experience trains that task's coefficients (and optional
    temporary directions) only, and its end calls
    :meth:`SharedSubspace.finish_task` (basis update, every task re-projected).
    Inference: the task label selects that task's coefficients, and without
    labels the mean update of all stored tasks is used.

New Parameters and the optimizer
    ``mode="per_task"`` (a new adapter) and Share (new coefficients at every
    experience, new layers after the first) create Parameters at task
    boundaries; ``mode="merge"`` never does (adapters are reset in place).
    Parameters made in ``setup`` exist before Lightning builds the optimizer,
    so one ``fit`` per experience needs nothing more. Inside one ``fit`` over
    several experiences, the callback rebuilds the optimizers with
    ``trainer.strategy.setup_optimizers(trainer)`` right after creating them:
    your ``configure_optimizers`` runs again (build it from the parameters
    that require gradients, or from all of them: frozen ones get no gradient),
    with fresh optimizer state, and learning-rate schedulers restart.

DDP
    Only the adapter being trained requires gradients; every other adapter
    (and every stored Share coefficient) is frozen, so DDP's reducer never
    waits for a gradient that cannot come. DDP records the trainable
    Parameters when it wraps the model at the start of ``fit``, so new
    Parameters in the middle of a ``fit`` cannot reach it: under DDP,
    ``mode="per_task"`` and Share need one ``fit`` per experience with
    ``strategy="ddp"`` (the new Parameters are then made in ``setup``, before
    DDP wraps the model), and raise a ConfigError when one ``fit`` spans
    several experiences. ``mode="merge"`` works in both stream styles. Every
    random draw (fresh adapters, Share's completions) uses generators seeded
    by ``seed``, the layer and the task, and Share's basis maths runs in
    float64 on the CPU, so all ranks end each boundary with identical
    weights; ``check_ranks=True`` verifies it with one all-gather per boundary.
    With ``ddp_spawn``, only rank 0's *weights* come back to the main process
    (loaded non-strictly into the un-adapted module there): the merged
    weights of ``mode="merge"`` arrive, per-task adapters and Share's
    coefficients do not, and a callback's state never comes back, so use
    ``strategy="ddp"`` for one ``fit`` per experience.

Resume
    Callback state (θ₀, the merger, the kept adapter, the adapter and task
    bookkeeping, Share's basis and coefficients, the per-task copies of the
    ``trainable`` modules) is in ``state_dict``; the
    adapters themselves are in the module's ``state_dict``. Lightning restores
    the module before the callbacks, into a module whose adapters this
    callback injected in ``setup``: per-task adapters are created by
    :class:`~cl_plugin.adapters.LoRALinear` when the checkpoint names them,
    and for Share a load-state-dict pre-hook on the module (registered in
    ``setup``, removed in ``teardown``) turns the LoRA layers into Share
    layers when the checkpoint holds Share's tensors. A run killed and resumed
    from a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from cl_plugin._checks import check_bool, check_scale
from cl_plugin.adapters.lora import (
    add_adapter,
    adapter_key,
    check_float,
    check_int,
    delete_adapter,
    InjectionSummary,
    inject_lora,
    lora_delta,
    lora_layers,
    reset_lora,
    set_active_adapter,
    use_adapter,
)
from cl_plugin.adapters.matching import Patterns, _normalise, match_modules
from cl_plugin.adapters.share import SharedLinear, SharedSubspace
from cl_plugin.errors import CheckpointError, ConfigError, did_you_mean, preview
from cl_plugin.merging import MERGERS, get_merger
from cl_plugin.task_vectors import TaskVector
from cl_plugin.callbacks._boundaries import TaskBoundaryCallback, experience_of, reset_optimizer_state, snapshot, write_into
from cl_plugin._checkpoint import check_bool_field, check_tensor_dict, layout_of, read
from cl_plugin.callbacks.model_merging import ModelMerging
from cl_plugin.merging.continual import merge_method_options

__all__ = ["LoRAAdapters", "SharedSubspaceAdapters"]

MODES = ("merge", "per_task")
START_FROM = {"merge": ("fresh", "finetuned", "merged"), "per_task": ("fresh", "finetuned")}
SHARE_INITS = ("previous", "fresh")
STATE_FORMAT_VERSION = 1
_MERGE_ADAPTER = "default"
# What a state written before an option existed was run with.
_OPTIONS_BEFORE_THEY_EXISTED = {"trainable_per_task": False}
_CPU = torch.device("cpu")


# -- helpers shared by both callbacks ----------------------------------------------------------
def _check_patterns(patterns: object, what: str, owner: str, *, required: bool) -> Patterns | None:
    if patterns is None and not required:
        return None
    if patterns is None:
        raise ConfigError(
            f"`{what}` is required ({owner}): a regex string or a list of module names, e.g. ['qkv', 'proj', 'fc1', 'fc2']."
        )
    normalised = _normalise(patterns, what)  # type, emptiness of entries, regex syntax
    if required and isinstance(normalised, tuple) and not normalised:
        raise ConfigError(f"`{what}` is empty ({owner}); name at least one module, e.g. ['qkv', 'proj', 'fc1', 'fc2'].")
    return normalised


def _exact_names_regex(names: Sequence[str]) -> str:
    """A full-match regex selecting exactly ``names`` (no suffix matching)."""
    return "|".join(re.escape(n) for n in names)


def _checksum(pl_module: LightningModule) -> Tensor:
    """Sum and absolute sum of every floating-point entry of the module's state, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in pl_module.state_dict().values():
        if t.is_floating_point():
            d = t.detach().double()
            total = total + d.sum().cpu() + d.abs().sum().cpu()
    return total


def _check_ranks_agree(trainer: Trainer, pl_module: LightningModule, owner: str) -> None:
    if trainer.world_size <= 1:
        return
    checksum = _checksum(pl_module).to(pl_module.device)
    gathered = trainer.strategy.all_gather(checksum)
    if not torch.all(gathered == gathered.reshape(-1)[0]):
        raise RuntimeError(
            f"{owner}: the weights differ across ranks after a task boundary (checksums {gathered.tolist()}). "
            "Every rank must make the same adapter updates; report this with your Trainer settings."
        )


def _labels_to_keys(task_labels: Any, batch_size: int) -> list[str] | None:
    """One adapter key per sample (None: no labels at all)."""
    if task_labels is None:
        return None
    if isinstance(task_labels, (str, numbers.Integral)) or (isinstance(task_labels, Tensor) and task_labels.dim() == 0):
        return [adapter_key(task_labels, "task label")] * batch_size
    labels = task_labels.tolist() if isinstance(task_labels, Tensor) else list(task_labels)
    if len(labels) != batch_size:
        raise ConfigError(f"Got {len(labels)} task labels for a batch of {batch_size}; pass one per sample.")
    return [adapter_key(label, "task label") for label in labels]


def _grouped_forward(inputs: Tensor, keys: list[Any], run: Callable[[Tensor, Any], Tensor]) -> Tensor:
    """One forward pass ``run(part, key)`` per distinct key; outputs put back in batch order."""
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == 1:
        return run(inputs, distinct[0])
    out: Tensor | None = None
    for key in distinct:
        index = torch.tensor([i for i, k in enumerate(keys) if k == key], device=inputs.device)
        part = run(inputs.index_select(0, index), key)
        if not isinstance(part, Tensor) or part.shape[0] != index.numel():
            raise ConfigError("forward_by_task needs a module whose output is a batch-first tensor.")
        if out is None:
            out = part.new_empty((inputs.shape[0], *part.shape[1:]))
        out[index] = part
    return out


def frozen_normalisation_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """BatchNorm / InstanceNorm layers with running statistics whose parameters do not train."""
    return [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase)
        and m.track_running_stats
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def _one_fit_spans_experiences(trainer: Trainer) -> bool:
    """True when this ``fit`` will visibly train several experiences (a ContinualDataModule-like datamodule)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "fixed_experience") or datamodule.fixed_experience is not None:
        return False
    per = getattr(datamodule, "epochs_per_experience", None)
    n = getattr(datamodule, "n_experiences", 1)
    max_epochs = trainer.max_epochs
    if not isinstance(per, int) or n <= 1 or max_epochs is None:
        return False
    return max_epochs == -1 or max_epochs > per


class _AdapterCallback(TaskBoundaryCallback):
    """What both callbacks share: LoRA arguments, injection in ``setup``, new Parameters, predict helpers."""

    _owner = "adapters"
    _needs_new_parameters_in_fit = True

    def __init__(
        self,
        target_modules: Patterns,
        *,
        exclude_modules: Patterns | None,
        r: int,
        alpha: float,
        dropout: float,
        trainable: Patterns,
        trainable_per_task: bool,
        seed: int,
        check_ranks: bool | None,
    ) -> None:
        super().__init__()
        owner = self._owner
        self.target_modules = _check_patterns(target_modules, "target_modules", owner, required=True)
        self.exclude_modules = _check_patterns(exclude_modules, "exclude_modules", owner, required=False)
        self.trainable = _check_patterns(trainable, "trainable", owner, required=False) or ()
        self.trainable_per_task = check_bool(trainable_per_task, "trainable_per_task", owner)
        if self.trainable_per_task and not (isinstance(self.trainable, str) or self.trainable):
            raise ConfigError(
                f"`trainable_per_task=True` keeps one copy of the `trainable` modules per task, but `trainable` names "
                f"none ({owner}); pass the modules too, e.g. trainable=['head'], trainable_per_task=True."
            )
        self.r = check_int(r, "r")
        self.alpha = check_float(alpha, "alpha", 0.0, float("inf"), low_open=True, high_open=True)
        self.dropout = check_float(dropout, "dropout", 0.0, 1.0, low_open=False, high_open=True)
        self.seed = check_int(seed, "seed", low=0)
        if check_ranks is None:
            check_ranks = os.environ.get("CL_PLUGIN_DEBUG", "0") == "1"
        self.check_ranks = check_bool(check_ranks, "check_ranks", owner)
        self._layer_names: tuple[str, ...] | None = None
        self._module: LightningModule | None = None
        # trainable_per_task: state names of the trainable modules, and one CPU copy of them per stored task
        self._task_module_names: list[str] = []
        self._task_modules: dict[str, dict[str, Tensor]] = {}
        self._frozen_norms: list[torch.nn.Module] | None = None

    # -- subclass hooks ----------------------------------------------------------------------------
    def _inject(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise NotImplementedError

    def _inject_lora(self, pl_module: LightningModule, adapter_name: str) -> InjectionSummary:
        """Wrap the target layers in LoRA with this callback's arguments; record what was wrapped."""
        self._record_trainable_modules(pl_module)
        summary = inject_lora(
            pl_module,
            self.target_modules,
            exclude_modules=self.exclude_modules,
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            trainable=self.trainable,
            adapter_name=adapter_name,
            seed=self.seed,
        )
        self._layer_names = summary.wrapped
        return summary

    def _prepare(self, pl_module: LightningModule, experience: int, *, dry_run: bool = False) -> bool:
        """Make ``experience``'s adapter the trained one; return True if new Parameters were (or would be) created."""
        return False

    def _apply_loaded(self, pl_module: LightningModule) -> None:
        """Apply the model-side part of a loaded state (active adapter, trainable flags)."""

    def _adapter_layer_names(self, pl_module: LightningModule) -> tuple[str, ...]:
        names = [n for n, m in pl_module.named_modules() if isinstance(m, SharedLinear)]
        return tuple(names) if names else tuple(lora_layers(pl_module))

    # -- trainable_per_task: one copy of the trainable modules per task (PEFT's modules_to_save) -------------
    @property
    def task_module_states(self) -> Mapping[str, Mapping[str, Tensor]]:
        """With ``trainable_per_task=True``: task -> the ``trainable`` modules' state stored for it (CPU copies)."""
        return {task: dict(copy) for task, copy in self._task_modules.items()}

    def _record_trainable_modules(self, pl_module: LightningModule) -> None:
        """Before injection: the state names of the ``trainable`` modules, which must hold no adapted layer."""
        if not self.trainable_per_task:
            return
        with warnings.catch_warnings():  # inject_lora matches again right after this and warns there
            warnings.simplefilter("ignore")
            wrapped = match_modules(pl_module, self.target_modules, self.exclude_modules, what="target_modules").matched
            modules = match_modules(pl_module, self.trainable, None, module_types=None, what="trainable").matched
        names: list[str] = []
        for module_name in modules:
            inside = [w for w in wrapped if module_name == "" or w.startswith(module_name + ".")]
            if inside:
                raise ConfigError(
                    f"{self._owner}: `trainable` module {module_name!r} contains adapted layers ({preview(inside, 3)}), "
                    "and trainable_per_task=True would store a full copy of it per task. Name smaller modules in "
                    "`trainable` (e.g. the head only)."
                )
            prefix = f"{module_name}." if module_name else ""
            names += [prefix + k for k, t in pl_module.get_submodule(module_name).state_dict().items() if t.is_floating_point()]
        self._task_module_names = list(dict.fromkeys(names))

    def _store_task_modules(self, pl_module: LightningModule, key: str | None) -> None:
        if self.trainable_per_task and key is not None:
            self._task_modules[key] = snapshot(pl_module, self._task_module_names, _CPU)

    def _install_task_modules(self, pl_module: LightningModule, key: str | None) -> None:
        """Write task ``key``'s stored copy into the module (nothing when none is stored for it)."""
        if self.trainable_per_task and key in self._task_modules:
            write_into(pl_module, self._task_modules[key])

    def _training_key(self) -> str | None:
        """The task whose adapter (or coefficients) is training now, if any."""
        return None

    def _task_module_overrides(self, pl_module: LightningModule, key: str | None) -> dict[str, Tensor] | None:
        """The stored copy a forward pass for task ``key`` uses, on the module's devices (None: the live weights).

        A task with a stored copy gets it; the task being trained, or any label
        while one trains, gets the live weights (they are that task's); without
        a training task, a label with no copy (or no label) gets the latest copy.
        """
        if not self.trainable_per_task or not self._task_modules:
            return None
        if key not in self._task_modules:
            if self._training_key() is not None:
                return None
            key = next(reversed(self._task_modules))
        out = {}
        for name, stored in self._task_modules[key].items():
            owner, _, attr = name.rpartition(".")
            live = getattr(pl_module.get_submodule(owner), attr)  # not state_dict(): this runs for every batch
            out[name] = stored.to(device=live.device, dtype=live.dtype)
        return out

    # -- Lightning hooks ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        adapter_callbacks = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, _AdapterCallback)]
        if len(adapter_callbacks) > 1:
            raise ConfigError(f"{self._owner}: one adapter callback per Trainer; found {adapter_callbacks}.")
        if any(isinstance(cb, ModelMerging) for cb in trainer.callbacks):
            raise ConfigError(
                f"{self._owner} merges (or keeps) the adapters itself; remove ModelMerging from the callbacks, "
                "it would fold the adapter factors as if they were weights."
            )
        if self._needs_new_parameters_in_fit and trainer.world_size > 1 and _one_fit_spans_experiences(trainer):
            raise ConfigError(self._ddp_one_fit_message(trainer))
        existing = self._adapter_layer_names(pl_module)
        if not existing:
            if self._layer_names is not None:
                raise ConfigError(
                    f"{self._owner}: the module has no adapter layers, but this callback injected them into "
                    f"{preview(self._layer_names, 3)} in an earlier fit. Pass the same module to every `fit` of the stream."
                )
            self._inject(trainer, pl_module)
        elif self._layer_names is None or tuple(existing) != tuple(self._layer_names):
            raise ConfigError(
                f"{self._owner}: the module already holds adapter layers ({preview(existing, 3)}) that this callback "
                "did not inject. Let the callback inject them: remove your inject_lora / SharedSubspace.inject call."
            )
        self._module = pl_module
        self._apply_loaded(pl_module)
        self._prepare(pl_module, experience_of(trainer, self._experiences_finished))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._module = None
            self._frozen_norms = None

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._frozen_norms = None  # an experience start may have changed what trains

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # A frozen normalisation layer would still update its running statistics in train
        # mode, and every stored adapter (or Share task) would then see other statistics
        # than it was trained with. Kept in eval mode, they stay θ₀'s. Set before every
        # batch: validation, or a user's `on_validation_model_train`, may switch modes back.
        if self._frozen_norms is None:
            self._frozen_norms = frozen_normalisation_layers(pl_module)
        for layer in self._frozen_norms:
            if layer.training:
                layer.eval()

    @override
    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int) -> None:
        if trainer.world_size > 1 and self._prepare(pl_module, experience, dry_run=True):
            raise ConfigError(self._ddp_one_fit_message(trainer))
        if self._prepare(pl_module, experience):
            # New Parameters exist now: let the optimizer know them (fresh state, schedulers restart).
            trainer.strategy.setup_optimizers(trainer)

    def _ddp_one_fit_message(self, trainer: Trainer) -> str:
        return (
            f"{self._owner} creates new Parameters at task boundaries ({self._what_is_new()}), and DDP "
            f"(world_size={trainer.world_size}) registers the trainable Parameters when it wraps the model at the "
            "start of `fit`. Run one `fit` per experience with strategy='ddp' (call datamodule.set_experience(i) "
            "before each `fit`): the new Parameters are then made in `setup`, before DDP wraps the model. "
            "LoRAAdapters(mode='merge') creates none and runs in one `fit`."
        )

    def _what_is_new(self) -> str:
        return "a new adapter per experience"

    # -- inference helpers -------------------------------------------------------------------------
    def _selector(self, pl_module: LightningModule) -> Callable[[Any], contextlib.AbstractContextManager]:
        raise NotImplementedError

    def forward_by_task(self, pl_module: LightningModule, inputs: Tensor, task_labels: Any = None) -> Tensor:
        """``pl_module(inputs)`` with each sample's task adapter.

        Args:
            pl_module: the module this callback trained.
            inputs: a batch-first tensor.
            task_labels: one label for the batch, one per sample (tensor or
                sequence), or None (no labels: see the callback's docstring).

        Returns:
            The module's output; a batch with several labels runs one forward
            pass per label and is put back in order.
        """
        keys = _labels_to_keys(task_labels, inputs.shape[0])
        keys = [None] * inputs.shape[0] if keys is None else keys
        select = self._selector(pl_module)

        def run(part: Tensor, key: Any) -> Tensor:
            with select(key):
                overrides = self._task_module_overrides(pl_module, key)
                if overrides is None:
                    return pl_module(part)
                # The task's copy stands in for the live tensors during this call only (nothing is
                # written in place), so the pass stays differentiable and the live weights untouched.
                return torch.func.functional_call(pl_module, overrides, (part,), strict=False)

        return _grouped_forward(inputs, keys, run)

    def predict(self, pl_module: LightningModule, batch: Sequence[Any]) -> Tensor:
        """Logits for a batch ``(x, y, task_labels)`` as Avalanche's datasets yield it.

        Pass it as ``ContinualEvaluation(predict=callback.predict)``; a batch
        ``(x, y)`` without labels is evaluated as :meth:`forward_by_task` does
        without labels.
        """
        labels = batch[2] if len(batch) > 2 else None
        return self.forward_by_task(pl_module, batch[0], labels)

    # -- checkpointing -----------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        """The arguments a checkpoint must have been written with to resume here."""
        raise NotImplementedError

    @override
    def state_dict(self) -> dict[str, Any]:
        """What both callbacks save; each adds its own state to it."""
        state = super().state_dict()
        state.update(format_version=STATE_FORMAT_VERSION, **self._options())
        state.update(
            layers=None if self._layer_names is None else list(self._layer_names),
            task_module_names=list(self._task_module_names),
            task_modules={k: dict(v) for k, v in self._task_modules.items()},
        )
        return state

    def _saved_options(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        # A state written before an option existed was run with that option's old behaviour.
        return {**_OPTIONS_BEFORE_THEY_EXISTED, **state}

    @override
    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        """Check the part both callbacks save; the subclass checks its own and applies both."""
        owner = self._owner
        names = state.get("task_module_names") or []
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"The checkpoint's {owner} state has task_module_names={names!r}; expected a list of names.")
        if names and self._task_module_names and list(names) != self._task_module_names:
            raise ConfigError(
                f"The checkpoint's {owner} kept per-task copies of {preview(names, 3)}, this run's `trainable` "
                f"modules hold {preview(self._task_module_names, 3)}; resume with the same `trainable`."
            )
        layers = state.get("layers")
        if layers is not None and (not isinstance(layers, (list, tuple)) or not all(isinstance(n, str) for n in layers)):
            raise CheckpointError(f"The checkpoint's {owner} state has layers={layers!r}; expected a list of module names.")
        if layers is not None and self._layer_names is not None and tuple(layers) != tuple(self._layer_names):
            raise ConfigError(
                f"The checkpoint's {owner} wrapped {preview(layers, 3)}, this run wraps "
                f"{preview(self._layer_names, 3)}; resume with the same `target_modules`."
            )
        saved = state.get("task_modules") or {}
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"The checkpoint's {owner} state has task_modules of type {type(saved).__name__}; expected a mapping.")
        task_modules = {
            str(k): check_tensor_dict(v, f"task_modules[{k!r}]", owner, names=names, device=_CPU) for k, v in saved.items()
        }

        def apply() -> None:
            if layers is not None:
                self._layer_names = tuple(layers)
            if names:
                self._task_module_names = list(names)
            self._task_modules = task_modules

        return apply


# ----------------------------------------------------------------------------------------------------
class LoRAAdapters(_AdapterCallback):
    """Train LoRA adapters instead of the full model; merge them, or keep one per task.

    Add it to your Trainer; nothing in the LightningModule changes::

        trainer = Trainer(callbacks=[LoRAAdapters(["qkv", "proj", "fc1", "fc2"], trainable=["head"])], ...)

    Args:
        target_modules: the ``nn.Linear`` layers to adapt, by name in the
            LightningModule (``model.blocks.0.attn.qkv``): a regex on the full
            name, or a list of names / dotted suffixes (PEFT's rule, see
            :mod:`cl_plugin.adapters.matching`), e.g. ``["qkv", "proj", "fc1", "fc2"]``.
        r: adapter rank (default 8).
        alpha: the update is scaled by ``alpha / r`` (default 16).
        dropout: dropout on the adapter input (default 0.0).
        trainable: modules trained in full beside the adapters, e.g.
            ``["head"]`` (default none). In ``"merge"`` mode their change is
            part of the task vector; in ``"per_task"`` mode they are shared by
            all tasks and keep training, unless ``trainable_per_task=True``.
        mode: ``"merge"`` (default: fold every adapter into one merged update)
            or ``"per_task"`` (keep one adapter per experience, select by task label).
        method: merging method of ``"merge"`` mode, a name in
            :data:`cl_plugin.merging.MERGERS` (default ``"magmax"``).
        scale: λ in θ₀ + λ·merged, in (0, 10]; ``None`` (default): the method's own.
        start_from: where each experience after the first starts. ``"merge"``
            mode: ``"fresh"`` (default: a new adapter, ΔW = 0, and the
            ``trainable`` modules back at θ₀), ``"finetuned"`` (keep training the
            same adapter and modules: sequential fine-tuning, the MagMax
            recipe) or ``"merged"`` (θ₀ + scale·merged, written into the base
            weights, plus a new adapter). ``"per_task"`` mode: ``"fresh"``
            (default: a new adapter) or ``"finetuned"`` (a copy of the previous
            task's adapter).
        exclude_modules: layers never to adapt (same rules as ``target_modules``).
        trainable_per_task: ``"per_task"`` mode: keep one copy of the
            ``trainable`` modules per task, like PEFT's ``modules_to_save``
            (default False: one copy shared by all tasks). Each experience
            trains them on from the previous task's copy; its end stores them
            for the task; the task label selects that copy together with the
            adapter. Shared modules drift with every task while the older
            adapters stay frozen, which costs the older tasks accuracy
            (``docs/adapters.md``).
        seed: seed of every adapter's initialisation (default 0); the same on all ranks.
        reset_optimizer: ``"merge"`` mode: clear the optimizers' state at every
            boundary inside one ``fit`` (default True). ``"per_task"`` rebuilds
            the optimizer there instead.
        check_ranks: under DDP, all-gather a checksum of the weights after each
            boundary and raise if ranks differ (default: on when
            ``CL_PLUGIN_DEBUG=1``).
        method_options: the merger's options as one mapping (the form a
            LightningCLI YAML file uses), e.g. ``{"top_k": 0.2}``.
        **more_method_options: passed to the merger (e.g. ``top_k=0.2`` for TIES).

    Raises:
        ConfigError: an argument out of range or of the wrong type, an unknown
            ``mode``, ``method``, ``start_from`` or method option; merging
            options given with ``mode="per_task"``. At ``setup``: another
            adapter callback or ``ModelMerging`` on the same Trainer, or
            ``mode="per_task"`` under DDP with one ``fit`` over several
            experiences (also raised at the boundary when the datamodule
            cannot tell in advance).
        NoMatchingModulesError: (at ``setup``) ``target_modules`` or
            ``trainable`` selects nothing; the message lists the names that exist.

    Attributes:
        merger: ``"merge"`` mode: the streaming merger (``merger.num_tasks`` experiences folded).
        tasks: ``"per_task"`` mode: the adapter names of the finished experiences, in order.
        task_module_states: with ``trainable_per_task=True``, task -> the stored
            copy of the ``trainable`` modules' state (CPU tensors).

    State (``state_dict``): ``format_version``, ``mode``, ``method``,
    ``method_options``, ``scale``, ``start_from``, ``r``, ``alpha``, ``seed``,
    ``layers`` (wrapped module names), ``trainable_names`` (parameter names),
    ``theta0`` (name -> CPU tensor: the wrapped base weights and the trainable
    parameters at the start), ``merger`` (its ``state_dict``), ``kept`` (the
    adapter and trainable parameters kept aside after ``fit``, or None),
    ``holds_merged``, ``tasks``, ``training_adapter``, ``trainable_per_task``,
    ``task_module_names`` and ``task_modules`` (task -> CPU copies of the
    trainable modules' state, with ``trainable_per_task=True``), and the
    boundary bookkeeping of :class:`TaskBoundaryCallback`.

    Example::

        lora = LoRAAdapters(["qkv", "proj", "fc1", "fc2"], r=8, trainable=["model.head"], mode="per_task")
        trainer = Trainer(max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[lora])
        trainer.fit(module, datamodule=dm)
        logits = lora.forward_by_task(module, x, task_labels)   # adapter by task label
    """

    _owner = "LoRAAdapters"
    _state_name = "LoRAAdapters"
    #: merge mode: ``scale`` is applied only when weights are written, so a resumed run may change it.
    _changeable_options = frozenset({"scale"})

    def __init__(
        self,
        target_modules: Patterns,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        trainable: Patterns = (),
        mode: str = "merge",
        method: str = "magmax",
        scale: float | None = None,
        start_from: str = "fresh",
        *,
        exclude_modules: Patterns | None = None,
        trainable_per_task: bool = False,
        seed: int = 0,
        reset_optimizer: bool = True,
        check_ranks: bool | None = None,
        method_options: Mapping[str, Any] | None = None,
        **more_method_options: Any,
    ) -> None:
        method_options = merge_method_options(method_options, more_method_options, "LoRAAdapters")
        if mode not in MODES:
            raise ConfigError(
                f"`mode` must be one of {list(MODES)}, got {mode!r} (LoRAAdapters).{did_you_mean(str(mode), MODES)}"
            )
        if not isinstance(method, str) or method not in MERGERS:
            raise ConfigError(
                f"Unknown merging method {method!r} (LoRAAdapters). Choose one of {sorted(MERGERS)}."
                + did_you_mean(str(method), MERGERS)
            )
        if mode == "per_task" and (method_options or scale is not None):
            given = sorted(method_options) + (["scale"] if scale is not None else [])
            raise ConfigError(
                f"{given} only apply to mode='merge'; mode='per_task' keeps every adapter and merges nothing (LoRAAdapters)."
            )
        if start_from not in START_FROM[mode]:
            raise ConfigError(
                f"`start_from` must be one of {list(START_FROM[mode])} with mode={mode!r}, got {start_from!r} "
                f"(LoRAAdapters).{did_you_mean(str(start_from), START_FROM[mode])}"
            )
        reset_optimizer = check_bool(reset_optimizer, "reset_optimizer", "LoRAAdapters")
        if mode == "merge" and check_bool(trainable_per_task, "trainable_per_task", "LoRAAdapters"):
            raise ConfigError(
                "`trainable_per_task=True` needs mode='per_task' (LoRAAdapters): in mode='merge' the `trainable` "
                "modules' change is part of each task vector and is merged like the adapters."
            )
        super().__init__(
            target_modules,
            exclude_modules=exclude_modules,
            r=r,
            alpha=alpha,
            dropout=dropout,
            trainable=trainable,
            trainable_per_task=trainable_per_task,
            seed=seed,
            check_ranks=check_ranks,
        )
        self.mode = mode
        self.method = method
        self.method_options = dict(method_options)
        self.merger = get_merger(method, **method_options)  # validates the options
        if mode == "merge":
            self.scale = self.merger.default_scale if scale is None else check_scale(scale, f"LoRAAdapters(method={method!r})")
        else:
            self.scale = None
        self.start_from = start_from
        self.reset_optimizer = reset_optimizer
        self._needs_new_parameters_in_fit = mode == "per_task"
        # merge mode
        self._weight_names: list[str] = []
        self._trainable_names: list[str] = []
        self._theta0: dict[str, Tensor] | None = None
        self._kept: dict[str, Tensor] | None = None
        self._holds_merged = False
        # per_task mode
        self._tasks: list[str] = []
        self._training_adapter: str | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    def _training_key(self) -> str | None:
        return self._training_adapter if self.mode == "per_task" else None

    @property
    def base_weights(self) -> dict[str, Tensor] | None:
        """θ₀ over the wrapped weights and trainable parameters (CPU), once known."""
        return self._theta0

    # -- injection and experiences ---------------------------------------------------------------------
    def _inject(self, trainer: Trainer, pl_module: LightningModule) -> None:
        first = _MERGE_ADAPTER if self.mode == "merge" else adapter_key(experience_of(trainer, self._experiences_finished))
        summary = self._inject_lora(pl_module, first)
        layers = lora_layers(pl_module)
        factor_ids = {id(p) for layer in layers.values() for d in (layer.lora_A, layer.lora_B) for p in d.values()}
        self._weight_names = [f"{n}.weight" for n in summary.wrapped]
        self._trainable_names = [
            n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in factor_ids and p.is_floating_point()
        ]
        if self.mode == "merge" and self._theta0 is None:
            # A resumed run replaces this with the checkpoint's θ₀ (load_state_dict runs after setup).
            self._theta0 = snapshot(pl_module, self._weight_names + self._trainable_names, _CPU)
        if self.mode == "per_task":
            self._training_adapter = first

    def _prepare(self, pl_module: LightningModule, experience: int, *, dry_run: bool = False) -> bool:
        if self.mode == "merge":
            return False
        key = adapter_key(experience)
        if key == self._training_adapter:
            return False
        if key in self._tasks:
            raise ConfigError(
                f"LoRAAdapters(mode='per_task'): experience {experience} already has a trained adapter {key!r}; "
                "each experience trains once. Adapters of finished experiences: " + str(self._tasks)
            )
        if dry_run:
            return True
        previous = self._tasks[-1] if self._tasks else None
        stale = self._training_adapter  # an experience that ended without a step: its adapter learnt nothing
        self._install_task_modules(pl_module, previous)  # undo any earlier select of another task's copy
        add_adapter(pl_module, key, seed=self.seed)
        if self.start_from == "finetuned" and previous is not None:
            with torch.no_grad():
                for layer in lora_layers(pl_module).values():
                    layer.lora_A[key].copy_(layer.lora_A[previous])
                    layer.lora_B[key].copy_(layer.lora_B[previous])
        set_active_adapter(pl_module, key)
        if stale is not None:
            delete_adapter(pl_module, stale)
        self._training_adapter = key
        return True

    @override
    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int) -> None:
        if self.mode == "merge":
            if self.reset_optimizer and self.merger.num_tasks > 0:
                reset_optimizer_state(trainer)
            return
        super().on_experience_start(trainer, pl_module, experience)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.mode == "merge" and self._holds_merged:
            # The module holds θ₀ + scale·merged from the previous fit's end.
            self._install_start_weights(pl_module)

    @override
    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool) -> None:
        if self.mode == "per_task":
            self._store_task_modules(pl_module, self._training_adapter)
            self._tasks.append(self._training_adapter)
            self._training_adapter = None
        else:
            self.merger.update(TaskVector(self._task_vector(pl_module)))
            if at_fit_end:
                self._hand_back_merged(pl_module)
            else:
                self._install_start_weights(pl_module)
        if self.check_ranks:
            _check_ranks_agree(trainer, pl_module, "LoRAAdapters")

    # -- merge mode internals ---------------------------------------------------------------------------
    def _factor_names(self) -> list[str]:
        return [f"{n}.lora_{s}.{_MERGE_ADAPTER}" for n in self._layer_names for s in "AB"]

    def _task_vector(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """τ = θ − θ₀: (base weight − θ₀) + adapter ΔW per wrapped layer, and the trainable parameters' change."""
        state = pl_module.state_dict()
        delta = lora_delta(pl_module, _MERGE_ADAPTER)
        out = {}
        with torch.no_grad():
            for n in self._weight_names:
                out[n] = (state[n].detach().to(_CPU) - self._theta0[n]) + delta[n].to(_CPU)
            for n in self._trainable_names:
                out[n] = state[n].detach().to(_CPU) - self._theta0[n]
        return out

    def _merged_tensors(self) -> dict[str, Tensor]:
        """θ₀ + scale·merged over the wrapped weights and trainable parameters (CPU)."""
        return self.merger.merged().apply_to(self._theta0, self.scale)

    def merged_state_dict(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The module's state dict with the wrapped weights and trainable parameters at θ₀ + scale·merged
        and the adapter's B at zero (``"merge"`` mode).

        Raises:
            ConfigError: not ``"merge"`` mode, or no experience folded yet.
        """
        self._require_merged()
        out = dict(pl_module.state_dict())
        for n, t in self._merged_tensors().items():
            out[n] = t.to(device=out[n].device, dtype=out[n].dtype)
        for n in self._factor_names():
            if ".lora_B." in n:
                out[n] = torch.zeros_like(out[n])
        return out

    @contextlib.contextmanager
    def merged_weights(self, pl_module: LightningModule) -> Iterator[LightningModule]:
        """Evaluate θ₀ + scale·merged inside the block (e.g. between experiences); the weights come back after."""
        self._require_merged()
        names = self._weight_names + self._trainable_names + self._factor_names()
        saved = snapshot(pl_module, names, _CPU)
        merged = self.merged_state_dict(pl_module)
        write_into(pl_module, {n: merged[n] for n in names})
        try:
            yield pl_module
        finally:
            write_into(pl_module, saved)

    def _require_merged(self) -> None:
        if self.mode != "merge":
            raise ConfigError("LoRAAdapters(mode='per_task') merges nothing; select an adapter with forward_by_task.")
        if self._theta0 is None or self.merger.num_tasks == 0:
            raise ConfigError("No experience has been merged yet: train at least one experience first.")

    def _hand_back_merged(self, pl_module: LightningModule) -> None:
        if self.start_from == "finetuned":  # the next fit continues from the trained adapter and modules
            self._kept = snapshot(pl_module, self._trainable_names + self._factor_names(), _CPU)
        else:
            self._kept = None
        write_into(pl_module, self._merged_tensors())
        with torch.no_grad():
            for layer in lora_layers(pl_module).values():
                layer.lora_B[_MERGE_ADAPTER].zero_()
        self._holds_merged = True

    def _install_start_weights(self, pl_module: LightningModule) -> None:
        """Set the weights the next experience trains from, as ``start_from`` says."""
        if self.start_from == "fresh":
            write_into(pl_module, self._theta0)
            reset_lora(pl_module, _MERGE_ADAPTER, seed=self.seed + self.merger.num_tasks)
        elif self.start_from == "finetuned":
            if self._holds_merged:
                write_into(pl_module, {n: self._theta0[n] for n in self._weight_names})
                write_into(pl_module, self._kept)
        else:
            write_into(pl_module, self._merged_tensors())
            reset_lora(pl_module, _MERGE_ADAPTER, seed=self.seed + self.merger.num_tasks)
        self._kept = None
        self._holds_merged = False

    # -- inference ----------------------------------------------------------------------------------------
    def _selector(self, pl_module: LightningModule):
        if self.mode == "merge":
            return lambda key: contextlib.nullcontext()
        known = set(self._tasks) | ({self._training_adapter} if self._training_adapter else set())
        return lambda key: use_adapter(pl_module, key if key in known else None)

    def forward_by_task(self, pl_module: LightningModule, inputs: Tensor, task_labels: Any = None) -> Tensor:
        """``pl_module(inputs)`` with each sample's adapter (``"per_task"``); ``"merge"`` mode: one plain pass.

        ``"per_task"`` mode: label ``k`` selects adapter ``"k"``; a label with no
        adapter yet, or ``task_labels=None``, uses the base model (no adapter).
        With ``trainable_per_task=True`` label ``k`` also gets task k's copy of
        the ``trainable`` modules; other labels get the latest task's copy (the
        live weights while an experience trains).
        """
        if self.mode == "merge":
            # One adapter serves every label: the batch is not split.
            _labels_to_keys(task_labels, inputs.shape[0])  # still refuse a label count that does not fit
            return pl_module(inputs)
        return super().forward_by_task(pl_module, inputs, task_labels)

    # -- checkpointing ------------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "method": self.method,
            "method_options": self.method_options,
            "scale": self.scale,
            "start_from": self.start_from,
            "trainable_per_task": self.trainable_per_task,
            "r": self.r,
            "alpha": self.alpha,
            "seed": self.seed,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            trainable_names=list(self._trainable_names),
            theta0=self._theta0,
            merger={k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.merger.state_dict().items()},
            kept=self._kept,
            holds_merged=self._holds_merged,
            tasks=list(self._tasks),
            training_adapter=self._training_adapter,
        )
        return state

    @override
    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner = self._owner
        apply_shared = super()._prepare_load(state)
        finished = state.get("experiences_finished", 0)
        trainable_names = state.get("trainable_names", self._trainable_names)
        if not isinstance(trainable_names, (list, tuple)) or not all(isinstance(n, str) for n in trainable_names):
            raise CheckpointError(f"The checkpoint's {owner} state has trainable_names={trainable_names!r}; expected a list of names.")
        layers = state.get("layers")
        weight_names = [f"{n}.weight" for n in (layers if layers is not None else self._layer_names or ())]
        merged_names = weight_names + list(trainable_names)
        layout = None
        if self._module is not None and self._layer_names is not None:
            module_state = self._module.state_dict()
            if all(n in module_state for n in merged_names):
                layout = layout_of({n: module_state[n] for n in merged_names})
        theta0 = state.get("theta0")
        if theta0 is not None:
            theta0 = check_tensor_dict(theta0, "theta0", owner, layout, names=merged_names, device=_CPU)
        elif self.mode == "merge" and (finished or state.get("training_experience") is not None):
            raise CheckpointError(f"The checkpoint's {owner} (mode='merge') has no θ₀ but {finished} finished experience(s); it is damaged.")
        merger = get_merger(self.method, **self.method_options)
        merger_state = state.get("merger")
        if merger_state is not None:
            merger.load_state_dict(merger_state)  # validates it completely; `merger` is a new object
        if self.mode == "merge" and merger.num_tasks != finished:
            raise CheckpointError(
                f"The checkpoint's {owner} records {finished} finished experience(s) but its merger holds "
                f"{merger.num_tasks}; it is damaged."
            )
        kept = state.get("kept")
        if kept is not None:
            kept = check_tensor_dict(kept, "kept", owner, device=_CPU)
        holds_merged = check_bool_field(state.get("holds_merged", False), "holds_merged", owner)
        if holds_merged and self.start_from == "finetuned" and kept is None:
            raise CheckpointError(f"The checkpoint's {owner} holds the merged model but not the adapter to continue from; it is damaged.")
        tasks = state.get("tasks", [])
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tasks):
            raise CheckpointError(f"The checkpoint's {owner} state has tasks={tasks!r}; expected a list of adapter names.")
        if self.mode == "per_task" and len(tasks) != finished:
            raise CheckpointError(
                f"The checkpoint's {owner} records {finished} finished experience(s) but {len(tasks)} stored adapter(s); it is damaged."
            )
        training_adapter = state.get("training_adapter")
        if training_adapter is not None and not isinstance(training_adapter, str):
            raise CheckpointError(f"The checkpoint's {owner} state has training_adapter={training_adapter!r}; expected None or a name.")

        def apply() -> None:
            apply_shared()
            self.merger = merger
            self._theta0 = theta0
            self._kept = kept
            self._holds_merged = holds_merged
            if self._layer_names is not None:
                self._weight_names = [f"{n}.weight" for n in self._layer_names]
            self._trainable_names = list(trainable_names)
            self._tasks = [str(t) for t in tasks]
            self._training_adapter = training_adapter
            if self._module is not None:
                self._apply_loaded(self._module)

        return apply

    def _apply_loaded(self, pl_module: LightningModule) -> None:
        if self.mode != "per_task" or not lora_layers(pl_module):
            return
        # The checkpoint's module state (loaded before this) created the adapters; train the right one.
        active = self._training_adapter or (self._tasks[-1] if self._tasks else None)
        if active is not None:
            set_active_adapter(pl_module, active)
            if self._training_adapter is None:  # every experience is finished: nothing trains until the next one
                for layer in lora_layers(pl_module).values():
                    layer.set_trainable(None)


# ----------------------------------------------------------------------------------------------------
class SharedSubspaceAdapters(_AdapterCallback):
    """Share: one shared low-rank subspace per layer, tiny coefficients per task.

    The first experience trains a LoRA (rank ``r``); at its end the shared
    basis is built from it; every later experience trains only its
    coefficients (K×p per side and layer, plus ``temporary_directions``), and
    its end updates the basis and re-projects every task
    (:class:`~cl_plugin.adapters.SharedSubspace`). Inference picks a task's
    coefficients by task label (:meth:`forward_by_task`, :meth:`predict`,
    :meth:`select`); without labels, the mean update of all stored tasks.

    Args:
        target_modules: the ``nn.Linear`` layers to adapt (PEFT's naming rule,
            as for :class:`LoRAAdapters`).
        k: basis size per side (default 32), or its upper bound with
            ``explained_variance``.
        p: columns of each task's coefficient matrices (default: ``r``).
        explained_variance: keep the smallest K per side whose squared singular
            values reach this fraction of the total, in (0, 1] (default: keep ``k``).
        temporary_directions: φ extra trainable directions per side while a task
            trains, folded into the basis at its end (default 0).
        r: rank of the first experience's LoRA (default 8).
        alpha: LoRA scaling numerator (default 16).
        dropout: LoRA dropout (default 0.0).
        trainable: modules trained in full beside the adapters (e.g. ``["head"]``):
            shared by all tasks, or one copy per task with ``trainable_per_task``.
        init: a new task's coefficients start as the previous task's
            (``"previous"``, default) or fresh (``"fresh"``: ΔW = 0).
        exclude_modules: layers never to adapt.
        trainable_per_task: keep one copy of the ``trainable`` modules per task
            (PEFT's ``modules_to_save``), selected by task label with the
            task's coefficients (default False: shared by all tasks). Each
            experience trains them on from the previous task's copy. With a
            shared head, the head drifts with every task while the stored
            coefficients stay frozen; on rotated digits that cost Share
            several points (``docs/adapters.md``).
        seed: seeds every random draw (default 0); the same on all ranks.
        check_ranks: as for :class:`LoRAAdapters`.

    Raises:
        ConfigError: an argument out of range (e.g. ``p > k``) or of the wrong
            type. At ``setup`` or the first boundary: DDP with one ``fit`` over
            several experiences (run one ``fit`` per experience), another
            adapter callback or ``ModelMerging`` on the Trainer.
        NoMatchingModulesError: (at ``setup``) ``target_modules`` selects nothing.

    Attributes:
        share: the :class:`~cl_plugin.adapters.SharedSubspace` once the first
            experience has ended (None before): ``share.tasks``,
            ``share.bytes_per_task()``, ``share.task_delta(t)``, ...
        task_module_states: with ``trainable_per_task=True``, task -> the stored
            copy of the ``trainable`` modules' state (CPU tensors).

    State (``state_dict``): ``format_version``, the options above, ``layers``,
    ``lora_task`` (the experience the LoRA trains), and ``share`` (the
    :meth:`SharedSubspace.state_dict`: basis, every task's coefficients,
    temporary directions while a task trains; or None before the first
    boundary), ``task_module_names`` and ``task_modules`` (per-task copies
    with ``trainable_per_task=True``), plus the boundary bookkeeping.

    Example::

        share = SharedSubspaceAdapters(["qkv", "proj", "fc1", "fc2"], k=8, r=8, trainable=["model.head"])
        trainer = Trainer(max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[share])
        trainer.fit(module, datamodule=dm)
        logits = share.forward_by_task(module, x, task_labels)
        logits = share.forward_by_task(module, x)               # no labels: the mean update
    """

    _owner = "SharedSubspaceAdapters"
    _state_name = "SharedSubspaceAdapters"

    def __init__(
        self,
        target_modules: Patterns,
        k: int = 32,
        p: int | None = None,
        explained_variance: float | None = None,
        temporary_directions: int = 0,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        trainable: Patterns = (),
        init: str = "previous",
        *,
        exclude_modules: Patterns | None = None,
        trainable_per_task: bool = False,
        seed: int = 0,
        check_ranks: bool | None = None,
    ) -> None:
        super().__init__(
            target_modules,
            exclude_modules=exclude_modules,
            r=r,
            alpha=alpha,
            dropout=dropout,
            trainable=trainable,
            trainable_per_task=trainable_per_task,
            seed=seed,
            check_ranks=check_ranks,
        )
        if init not in SHARE_INITS:
            raise ConfigError(
                f"`init` must be one of {list(SHARE_INITS)}, got {init!r} (SharedSubspaceAdapters)."
                + did_you_mean(str(init), SHARE_INITS)
            )
        # SharedSubspace checks k, p, explained_variance and temporary_directions; build one now to fail early.
        SharedSubspace(
            k, p, explained_variance=explained_variance, temporary_directions=temporary_directions, init=init, seed=self.seed
        )
        self.k = int(k)
        self.p = None if p is None else int(p)
        self.explained_variance = None if explained_variance is None else float(explained_variance)
        self.temporary_directions = int(temporary_directions)
        self.init = init
        self.share: SharedSubspace | None = None
        self._lora_task: str | None = None
        self._hook = None
        self._pending_share: dict[str, Any] | None = None

    def _new_share(self) -> SharedSubspace:
        return SharedSubspace(
            self.k,
            self.p,
            explained_variance=self.explained_variance,
            temporary_directions=self.temporary_directions,
            init=self.init,
            seed=self.seed,
        )

    def _what_is_new(self) -> str:
        return "Share's layers after the first experience and each task's coefficients"

    def _training_key(self) -> str | None:
        return self._lora_task if self.share is None else self.share.training_task

    # -- injection and experiences -----------------------------------------------------------------------
    def _inject(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._inject_lora(pl_module, _MERGE_ADAPTER)
        self._lora_task = adapter_key(experience_of(trainer, self._experiences_finished))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(self._share_structure_pre_hook)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._hook is not None:
            self._hook.remove()
            self._hook = None
        super().teardown(trainer, pl_module, stage)

    def _prepare(self, pl_module: LightningModule, experience: int, *, dry_run: bool = False) -> bool:
        key = adapter_key(experience)
        share = self.share
        if share is None:  # the LoRA phase
            if key != self._lora_task and not dry_run:
                # The LoRA's experience ended without a step (nothing learnt): it trains this one instead.
                reset_lora(pl_module, _MERGE_ADAPTER, seed=self.seed)
                self._lora_task = key
            return False
        if share.training_task == key:
            return False
        if key in share.tasks:
            raise ConfigError(
                f"SharedSubspaceAdapters: experience {experience} is already stored as task {key!r}; each "
                f"experience trains once. Stored tasks: {list(share.tasks)}."
            )
        if dry_run:
            return True
        if share.training_task is not None:
            share.cancel_task()  # an experience that ended without a step: store nothing for it
        self._install_task_modules(pl_module, share.tasks[-1])  # undo any earlier select of another task's copy
        share.start_task(key)
        return True

    @override
    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool) -> None:
        if self.share is None:
            self._store_task_modules(pl_module, self._lora_task)
            self._build_share(pl_module, self._lora_task)
        else:
            self._store_task_modules(pl_module, self.share.training_task)
            self.share.finish_task()
        if self.check_ranks:
            _check_ranks_agree(trainer, pl_module, "SharedSubspaceAdapters")

    # -- inference ----------------------------------------------------------------------------------------
    def select(self, task_label: int | str | None, pl_module: LightningModule | None = None) -> None:
        """Use task ``task_label``'s update from now on; ``None``: the mean update of all stored tasks.

        With ``trainable_per_task=True`` pass the module too: the task's copy of
        the ``trainable`` modules is written into it (``None``: the latest
        task's copy). The next experience starts again from the latest task's copy.
        """
        if self.share is None:
            raise ConfigError("SharedSubspaceAdapters: no Share layers yet; finish the first experience first.")
        if self.trainable_per_task and pl_module is None:
            raise ConfigError(
                "SharedSubspaceAdapters(trainable_per_task=True) keeps the `trainable` modules per task: pass the "
                "module as well, select(task_label, module), so that they are switched with the coefficients."
            )
        self.share.select(task_label)
        if pl_module is not None and self.share.tasks:
            key = self.share.tasks[-1] if task_label is None else adapter_key(task_label, "task label")
            self._install_task_modules(pl_module, key)

    def _selector(self, pl_module: LightningModule):
        share = self.share
        if share is None:  # LoRA phase: the LoRA's task (or no label) uses it; other labels the base model
            return lambda key: use_adapter(pl_module, _MERGE_ADAPTER if key in (None, self._lora_task) else None)
        known = set(share.tasks) | ({share.training_task} if share.training_task else set())

        @contextlib.contextmanager
        def select(key):
            layers = list(share.layers.values())
            before = [layer.get_selection() for layer in layers]
            try:
                if key is None:
                    if share.tasks:
                        share.select(None)
                    else:
                        share.select(share.training_task)
                elif key in known:
                    share.select(key)
                else:
                    share.disable()
                yield
            finally:
                for layer, state in zip(layers, before):
                    layer.set_selection(state)

        return select

    def forward_by_task(self, pl_module: LightningModule, inputs: Tensor, task_labels: Any = None) -> Tensor:
        """``pl_module(inputs)`` with each sample's task update.

        Label ``k`` selects task ``"k"``'s coefficients (the experience index);
        ``task_labels=None`` uses the mean update of all stored tasks; a label
        of a task not trained yet uses the base model. With
        ``trainable_per_task=True`` label ``k`` also gets task k's copy of the
        ``trainable`` modules; other labels get the latest task's copy (the
        live weights while an experience trains), whatever :meth:`select` wrote.
        """
        return super().forward_by_task(pl_module, inputs, task_labels)

    # -- resume: rebuild Share's layers before the module's state loads -----------------------------------
    def _share_structure_pre_hook(self, module, state_dict, prefix, *args) -> None:
        if self.share is not None or not self._layer_names:
            return
        first = self._layer_names[0]
        head = f"{prefix}{first}.coef_a."
        saved_tasks = [k[len(head) :] for k in state_dict if k.startswith(head)]
        if f"{prefix}{first}.basis_a" not in state_dict or not saved_tasks:
            return
        # The checkpoint was written after the first boundary: wrap the LoRA layers in Share
        # layers now, so the module's state loads; the values come from the checkpoint.
        self._build_share(module, saved_tasks[0])

    def _build_share(self, module: LightningModule, first_task: str) -> None:
        share = self._new_share()
        share.inject(module, _exact_names_regex(self._layer_names), lora_task=first_task, trainable=self.trainable)
        self.share = share

    # -- checkpointing ------------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "p": self.p,
            "explained_variance": self.explained_variance,
            "temporary_directions": self.temporary_directions,
            "init": self.init,
            "trainable_per_task": self.trainable_per_task,
            "r": self.r,
            "alpha": self.alpha,
            "seed": self.seed,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(lora_task=self._lora_task, share=None if self.share is None else self.share.state_dict())
        return state

    @override
    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner = self._owner
        apply_shared = super()._prepare_load(state)
        lora_task = state.get("lora_task", self._lora_task)
        if lora_task is not None and not isinstance(lora_task, str):
            raise CheckpointError(f"The checkpoint's {owner} state has lora_task={lora_task!r}; expected None or a name.")
        saved_share = state.get("share")
        if saved_share is not None and (not isinstance(saved_share, Mapping) or not isinstance(saved_share.get("tasks"), (list, tuple))):
            raise CheckpointError(f"The checkpoint's {owner} state has a damaged `share` entry.")
        finished = state.get("experiences_finished", 0)
        stored = 0 if saved_share is None else len(saved_share["tasks"])
        if stored != finished:
            raise CheckpointError(
                f"The checkpoint's {owner} records {finished} finished experience(s) but Share holds {stored} task(s); it is damaged."
            )

        def apply() -> None:
            if saved_share is not None and self.share is not None:
                # Lightning's resume: the pre-hook built Share's layers while the module's state
                # loaded. First, since it checks the state and changes nothing when it raises.
                self.share.load_state_dict(saved_share)
            apply_shared()
            self._lora_task = lora_task
            if saved_share is not None and self.share is None:
                # Loaded by hand: applied to the module in `setup` (or now, if one is set up).
                self._pending_share = saved_share
                if self._module is not None:
                    self._apply_loaded(self._module)

        return apply

    def _apply_loaded(self, pl_module: LightningModule) -> None:
        saved, self._pending_share = self._pending_share, None
        if saved is None or self.share is not None:
            return
        share = self._new_share()
        if any(isinstance(m, SharedLinear) for m in pl_module.modules()):
            share.attach(pl_module, _exact_names_regex(self._layer_names))  # the same module, wrapped earlier
            self.share = share
        else:
            self._build_share(pl_module, saved["tasks"][0])
        self.share.load_state_dict(saved)
