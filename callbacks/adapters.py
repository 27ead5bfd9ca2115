"""``LoRAAdapters`` and ``SharedSubspaceAdapters``: adapters managed at task boundaries.

Both callbacks inject LoRA into the LightningModule when ``fit`` sets up, so
that only the adapters and the modules named in ``trainable=`` train, and act
at every task boundary that :class:`TaskBoundaryCallback` finds (one ``fit``
over a :class:`~cl_plugin.benchmarks.ContinualDataModule`, or one ``fit`` per
experience):

* ``LoRAAdapters(mode="merge")`` folds each experience's task vector (the
  adapter's ΔW, the base weights' change and the ``trainable`` modules' change)
  through the boundary core :class:`~cl_plugin.merging.continual.ContinualMerge`,
  the one ``ModelMerging`` runs on;
* ``LoRAAdapters(mode="per_task")`` keeps one adapter per experience and picks
  it by task label;
* ``SharedSubspaceAdapters`` trains a LoRA on the first experience, builds
  Share's basis from it, and then trains a few coefficients per experience.

The algorithms are those of :mod:`cl_plugin.adapters`; the callbacks decide
when to call them. The user guide (stream styles, the head per task, DDP,
resume, which to choose) is ``docs/adapters.md``.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from cl_plugin._checkpoint import check_bool_field, check_count, check_tensor_dict, layout_of
from cl_plugin._checks import check_bool
from cl_plugin.adapters.config import DEFAULT_LAYER_TYPES, LoRAConfig, ShareConfig, adapter_key
from cl_plugin.adapters.layer import adapter_layers, forward_routed, labels_to_keys, use_adapter
from cl_plugin.adapters.lora import add_adapter, delete_adapter, inject, lora_delta, lora_layers, reset_lora, set_active_adapter, weight_key
from cl_plugin.adapters.matching import Patterns, match_modules
from cl_plugin.adapters.share import SharedLinear, SharedSubspace, wrap_for_loading
from cl_plugin.callbacks._boundaries import (
    TaskBoundaryCallback,
    check_ranks_agree,
    experience_of,
    merge_shard,
    reset_optimizer_state,
    snapshot,
    write_into,
)
from cl_plugin.callbacks.model_merging import ModelMerging
from cl_plugin.errors import CheckpointError, ConfigError, did_you_mean, preview
from cl_plugin.merging.continual import ContinualMerge, merge_method_options
from cl_plugin.task_vectors import TaskVector

__all__ = ["LoRAAdapters", "SharedSubspaceAdapters"]

MODES = ("merge", "per_task")
START_FROM = {"merge": ("pretrained", "finetuned", "merged"), "per_task": ("pretrained", "finetuned")}
#: Old names of ``start_from`` values, accepted with a warning (and in checkpoints that recorded them).
START_FROM_ALIASES = {"fresh": "pretrained"}
_MERGE_ADAPTER = "default"
# What a state written before an option existed was run with.
_OPTIONS_BEFORE_THEY_EXISTED = {"trainable_per_task": False}
_CPU = torch.device("cpu")


# -- helpers shared by both callbacks ----------------------------------------------------------
def _exact_names_regex(names: Sequence[str]) -> str:
    """A full-match regex selecting exactly ``names`` (no suffix matching)."""
    return "|".join(re.escape(n) for n in names)


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


def _names(value: object, key: str, owner: str, *, optional: bool = False) -> list[str] | None:
    """A saved list of names, checked."""
    if value is None and optional:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise CheckpointError(f"The checkpoint's {owner} state has {key}={value!r}; expected a list of names.")
    return list(value)


class _AdapterCallback(TaskBoundaryCallback):
    """What both callbacks share: the LoRA options, injection in ``setup``, new Parameters, ``forward_by_task``."""

    _owner = "adapters"
    _needs_new_parameters_in_fit = True
    #: 2: the tensors of Share and of the merge core live where they belong (module, ``ContinualMerge``).
    state_format_version = 2

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
        layer_types: Sequence[str],
    ) -> None:
        super().__init__()
        owner = self._owner
        self.lora = LoRAConfig(target_modules, exclude_modules, r, alpha, dropout, trainable, seed, layer_types)
        self.lora.require_targets(owner)
        self.trainable_per_task = check_bool(trainable_per_task, "trainable_per_task", owner)
        if self.trainable_per_task and not (isinstance(self.trainable, str) or self.trainable):
            raise ConfigError(
                f"`trainable_per_task=True` keeps one copy of the `trainable` modules per task, but `trainable` names "
                f"none ({owner}); pass the modules too, e.g. trainable=['head'], trainable_per_task=True."
            )
        if check_ranks is None:
            check_ranks = os.environ.get("CL_PLUGIN_DEBUG", "0") == "1"
        self.check_ranks = check_bool(check_ranks, "check_ranks", owner)
        self._layer_names: tuple[str, ...] | None = None
        self._module: LightningModule | None = None
        # trainable_per_task: state names of the trainable modules, and one CPU copy of them per stored task
        self._task_module_names: list[str] = []
        self._task_modules: dict[str, dict[str, Tensor]] = {}
        self._frozen_norms: list[torch.nn.Module] | None = None

    # The LoRA options, as attributes (what the constructor took).
    target_modules = property(lambda self: self.lora.target_modules)
    exclude_modules = property(lambda self: self.lora.exclude_modules)
    trainable = property(lambda self: self.lora.trainable)
    r = property(lambda self: self.lora.r)
    alpha = property(lambda self: self.lora.alpha)
    dropout = property(lambda self: self.lora.dropout)
    seed = property(lambda self: self.lora.seed)

    # -- subclass hooks ----------------------------------------------------------------------------
    def _inject(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise NotImplementedError

    def _prepare(self, pl_module: LightningModule, experience: int, *, dry_run: bool = False) -> bool:
        """Make ``experience``'s adapter the trained one; return True if new Parameters were (or would be) created."""
        return False

    def _apply_loaded(self, pl_module: LightningModule) -> None:
        """Apply the model-side part of a loaded state (active adapter, trainable flags, Share's manager)."""

    def _training_key(self) -> str | None:
        """The task whose adapter (or coefficients) is training now, if any."""
        return None

    def _route(self, key: str) -> str | None:
        """The adapter a sample labelled ``key`` uses (None: the base model)."""
        raise NotImplementedError

    def _unlabelled(self, pl_module: LightningModule) -> contextlib.AbstractContextManager:
        """The selection a batch without labels runs with."""
        raise NotImplementedError

    def _inject_lora(self, pl_module: LightningModule, adapter_name: str) -> tuple[str, ...]:
        """Wrap the target layers in LoRA with this callback's options; record what was wrapped."""
        self._record_trainable_modules(pl_module)
        summary = inject(pl_module, self.lora, adapter_name=adapter_name, owner=self._owner)
        self._layer_names = summary.wrapped
        return summary.wrapped

    # -- trainable_per_task: one copy of the trainable modules per task (PEFT's modules_to_save) -------------
    @property
    def task_module_states(self) -> Mapping[str, Mapping[str, Tensor]]:
        """With ``trainable_per_task=True``: task -> the ``trainable`` modules' state stored for it (CPU copies)."""
        return {task: dict(copy) for task, copy in self._task_modules.items()}

    def _record_trainable_modules(self, pl_module: LightningModule) -> None:
        """Before injection: the state names of the ``trainable`` modules, which must hold no adapted layer."""
        if not self.trainable_per_task:
            return
        from cl_plugin.adapters.lora_layer import lora_target_types

        with warnings.catch_warnings():  # the injection matches again right after this and warns there
            warnings.simplefilter("ignore")
            types = lora_target_types(self.lora.layer_types)
            wrapped = match_modules(pl_module, self.target_modules, self.exclude_modules, module_types=types).matched
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

    def _copy_for(self, key: str | None) -> str | None:
        """The stored copy a sample labelled ``key`` (None: no label) runs with; None: the live weights.

        A task with a stored copy gets it; while a task trains, any other label
        gets the live weights (they are the training task's); otherwise a label
        with no copy gets the latest copy.
        """
        if not self.trainable_per_task or not self._task_modules:
            return None
        if key in self._task_modules:
            return key
        return None if self._training_key() is not None else next(reversed(self._task_modules))

    def _copy_call(self, pl_module: LightningModule, copy: str | None) -> Callable[[Tensor], Tensor]:
        """``pl_module`` as a function of its input, with the stored copy ``copy`` standing in for the live tensors."""
        if copy is None:
            return pl_module
        overrides = {}
        for name, stored in self._task_modules[copy].items():
            owner, _, attr = name.rpartition(".")
            live = getattr(pl_module.get_submodule(owner), attr)  # not state_dict(): this runs for every batch
            overrides[name] = stored.to(device=live.device, dtype=live.dtype)
        # Nothing is written in place, so the pass stays differentiable and the live weights untouched.
        return lambda x: torch.func.functional_call(pl_module, overrides, (x,), strict=False)

    # -- Lightning hooks ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy):
            raise ConfigError(
                f"{self._owner} does not run under ModelParallelStrategy (FSDP2) yet: its adapter layers around "
                "sharded weights are not tested, and a wrong merge would be silent. Use strategy='ddp' (merge mode "
                "shards the merge over the ranks there), or ModelMerging for full-weight merging under FSDP2."
            )
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
        existing = tuple(adapter_layers(pl_module))
        if not existing:
            if self._layer_names is not None:
                raise ConfigError(
                    f"{self._owner}: the module has no adapter layers, but this callback injected them into "
                    f"{preview(self._layer_names, 3)} in an earlier fit. Pass the same module to every `fit` of the stream."
                )
            self._inject(trainer, pl_module)
        elif self._layer_names is None or existing != tuple(self._layer_names):
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

    # -- inference: one forward_by_task contract ------------------------------------------------------
    def forward_by_task(self, pl_module: LightningModule, inputs: Tensor, task_labels: Any = None) -> Tensor:
        """``pl_module(inputs)`` with each sample's task adapter.

        The contract of :func:`cl_plugin.adapters.forward_by_task`: label ``k``
        selects task ``k``'s adapter (or coefficients), a label with none (a
        task not trained yet) runs through the base model, and a batch with
        several labels is one pass in which each adapter layer applies each
        adapter to its own rows. With ``trainable_per_task=True`` the rows of
        each task also get that task's copy of the ``trainable`` modules,
        one pass per copy.

        Args:
            pl_module: the module this callback trained.
            inputs: a batch-first tensor.
            task_labels: one label for the batch, one per sample (tensor or
                sequence), or None (no labels: see each callback).

        Returns:
            The module's output.
        """
        n = inputs.shape[0]
        keys = labels_to_keys(task_labels, n)
        if keys is None:
            with self._unlabelled(pl_module):
                return self._copy_call(pl_module, self._copy_for(None))(inputs)
        routes = [self._route(k) for k in keys]
        copies = [self._copy_for(k) for k in keys]
        distinct = list(dict.fromkeys(copies))
        if len(distinct) == 1:
            return forward_routed(pl_module, inputs, routes, call=self._copy_call(pl_module, distinct[0]))
        out: Tensor | None = None
        for copy in distinct:
            rows = [i for i, c in enumerate(copies) if c == copy]
            index = torch.tensor(rows, device=inputs.device)
            part = forward_routed(
                pl_module, inputs.index_select(0, index), [routes[i] for i in rows], call=self._copy_call(pl_module, copy)
            )
            if not isinstance(part, Tensor) or part.shape[0] != index.numel():
                raise ConfigError("forward_by_task needs a module whose output is a batch-first tensor.")
            if out is None:
                out = part.new_empty((n, *part.shape[1:]))
            out[index] = part
        return out

    def predict(self, pl_module: LightningModule, batch: Sequence[Any]) -> Tensor:
        """Logits for a batch ``(x, y, task_labels)`` as Avalanche's datasets yield it.

        Pass it as ``ContinualEvaluation(predict=callback.predict)``; a batch
        ``(x, y)`` without labels is evaluated as :meth:`forward_by_task` does
        without labels.
        """
        labels = batch[2] if len(batch) > 2 else None
        return self.forward_by_task(pl_module, batch[0], labels)

    # -- checkpointing -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """What both callbacks save; each adds its own state to it."""
        state = super().state_dict()
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
        names = _names(state.get("task_module_names") or [], "task_module_names", owner)
        if names and self._task_module_names and names != self._task_module_names:
            raise ConfigError(
                f"The checkpoint's {owner} kept per-task copies of {preview(names, 3)}, this run's `trainable` "
                f"modules hold {preview(self._task_module_names, 3)}; resume with the same `trainable`."
            )
        layers = _names(state.get("layers"), "layers", owner, optional=True)
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
        target_modules: the layers to adapt, by name in the LightningModule
            (``model.blocks.0.attn.qkv``): a regex on the full name, or a list
            of names / dotted suffixes (PEFT's rule, see
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
        start_from: where each experience after the first starts, with
            ``ModelMerging``'s names. ``"merge"`` mode: ``"pretrained"``
            (default: a new adapter, ΔW = 0, and the ``trainable`` modules back
            at θ₀), ``"finetuned"`` (keep training the same adapter and
            modules: sequential fine-tuning, the MagMax recipe) or ``"merged"``
            (θ₀ + scale·merged, written into the base weights, plus a new
            adapter). ``"per_task"`` mode: ``"pretrained"`` (default: a new
            adapter) or ``"finetuned"`` (a copy of the previous task's
            adapter). ``"fresh"``, the earlier name of ``"pretrained"``, is
            accepted with a FutureWarning.
        exclude_modules: layers never to adapt (same rules as ``target_modules``).
        trainable_per_task: ``"per_task"`` mode: keep one copy of the
            ``trainable`` modules per task, like PEFT's ``modules_to_save``
            (default False: one copy shared by all tasks).
        seed: seed of every adapter's initialisation (default 0); the same on all ranks.
        reset_optimizer: ``"merge"`` mode: clear the optimizers' state at every
            boundary inside one ``fit`` (default True). ``"per_task"`` rebuilds
            the optimizer there instead.
        check_ranks: under DDP, all-gather a checksum of the weights after each
            boundary and raise if ranks differ (default: on when
            ``CL_PLUGIN_DEBUG=1``).
        layer_types: the layer types a name may select (default ``("Linear",
            "Conv1D")``; add ``"Conv2d"`` or ``"Embedding"`` to adapt those,
            see :class:`~cl_plugin.adapters.LoRAConfig`).
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
        core: the boundary core (θ₀, the merger, the scale) of ``"merge"`` mode.
        merger: ``core.merger`` (``merger.num_tasks`` experiences folded).
        tasks: ``"per_task"`` mode: the adapter names of the finished experiences, in order.
        task_module_states: with ``trainable_per_task=True``, task -> the stored
            copy of the ``trainable`` modules' state (CPU tensors).

    State (``state_dict``, ``format_version`` 2): the options above, ``layers``
    (wrapped module names), the boundary core's ``names``, ``statistic_names``,
    ``theta0`` (name -> CPU tensor: the wrapped base weights and the trainable
    parameters at the start), ``merger`` and ``statistics_merger``; ``kept``
    (the adapter and trainable parameters kept aside after ``fit``, or None),
    ``holds_merged``, ``tasks``, ``training_adapter``, ``task_module_names`` and
    ``task_modules`` (task -> CPU copies of the trainable modules' state, with
    ``trainable_per_task=True``), and the boundary bookkeeping of
    :class:`TaskBoundaryCallback`. States of format 1 load too.

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
        start_from: str = "pretrained",
        *,
        exclude_modules: Patterns | None = None,
        trainable_per_task: bool = False,
        seed: int = 0,
        reset_optimizer: bool = True,
        check_ranks: bool | None = None,
        layer_types: Sequence[str] = DEFAULT_LAYER_TYPES,
        method_options: Mapping[str, Any] | None = None,
        **more_method_options: Any,
    ) -> None:
        owner = "LoRAAdapters"
        method_options = merge_method_options(method_options, more_method_options, owner)
        if mode not in MODES:
            raise ConfigError(f"`mode` must be one of {list(MODES)}, got {mode!r} ({owner}).{did_you_mean(str(mode), MODES)}")
        if mode == "per_task" and (method_options or scale is not None):
            given = sorted(method_options) + (["scale"] if scale is not None else [])
            raise ConfigError(f"{given} only apply to mode='merge'; mode='per_task' keeps every adapter and merges nothing ({owner}).")
        if start_from in START_FROM_ALIASES:
            new = START_FROM_ALIASES[start_from]
            warnings.warn(
                f"LoRAAdapters(start_from={start_from!r}) is deprecated: it is start_from={new!r}, ModelMerging's name "
                "for the same choice. Pass that instead.",
                FutureWarning,
                stacklevel=2,
            )
            start_from = new
        if start_from not in START_FROM[mode]:
            raise ConfigError(
                f"`start_from` must be one of {list(START_FROM[mode])} with mode={mode!r}, got {start_from!r} "
                f"({owner}).{did_you_mean(str(start_from), START_FROM[mode])}"
            )
        reset_optimizer = check_bool(reset_optimizer, "reset_optimizer", owner)
        if mode == "merge" and check_bool(trainable_per_task, "trainable_per_task", owner):
            raise ConfigError(
                "`trainable_per_task=True` needs mode='per_task' (LoRAAdapters): in mode='merge' the `trainable` "
                "modules' change is part of each task vector and is merged like the adapters."
            )
        # The core checks the method, its options and the scale.
        self.core = ContinualMerge(method, scale=scale, method_options=method_options)
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
            layer_types=layer_types,
        )
        self.mode = mode
        self.method = method
        self.method_options = dict(method_options)
        self.start_from = start_from
        self.reset_optimizer = reset_optimizer
        self._needs_new_parameters_in_fit = mode == "per_task"
        # merge mode: the kept adapter and trainable parameters, and whether the module holds the merge
        self._kept: dict[str, Tensor] | None = None
        self._holds_merged = False
        # per_task mode
        self._tasks: list[str] = []
        self._training_adapter: str | None = None

    @property
    def merger(self):
        """The streaming merger (``"merge"`` mode); ``merger.num_tasks`` experiences are folded."""
        return self.core.merger

    @property
    def scale(self) -> float | None:
        """λ in θ₀ + λ·merged (``"merge"`` mode; None in ``"per_task"`` mode)."""
        return self.core.scale if self.mode == "merge" else None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    @property
    def base_weights(self) -> dict[str, Tensor] | None:
        """θ₀ over the wrapped weights and trainable parameters (CPU), once known."""
        return self.core.theta0

    def _training_key(self) -> str | None:
        return self._training_adapter if self.mode == "per_task" else None

    # -- injection and experiences ---------------------------------------------------------------------
    def _inject(self, trainer: Trainer, pl_module: LightningModule) -> None:
        first = _MERGE_ADAPTER if self.mode == "merge" else adapter_key(experience_of(trainer, self._experiences_finished))
        wrapped = self._inject_lora(pl_module, first)
        if self.mode == "per_task":
            self._training_adapter = first
            return
        factor_ids = {id(p) for layer in lora_layers(pl_module).values() for p in layer.adapter_parameters()}
        trainable = [
            n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in factor_ids and p.is_floating_point()
        ]
        # Under DDP every rank holds and folds 1/W of each merged tensor (the boundary core's split).
        self.core.bind(pl_module, names=[weight_key(n) for n in wrapped] + trainable, shard=merge_shard(trainer))
        if self.core.theta0 is None:
            # A resumed run replaces this with the checkpoint's θ₀ (load_state_dict runs after setup).
            self.core.capture_theta0(pl_module, "LoRAAdapters: θ₀ (the weights when training starts)")

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
                    for store in layer.adapter_layer_names:
                        getattr(layer, store)[key].copy_(getattr(layer, store)[previous])
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
            self.core.fold(self._task_vector(pl_module))
            if at_fit_end:
                self._hand_back_merged(pl_module)
            else:
                self._install_start_weights(pl_module)
        if self.check_ranks:
            check_ranks_agree(trainer, pl_module, "LoRAAdapters")

    # -- merge mode internals ---------------------------------------------------------------------------
    @property
    def _weight_names(self) -> list[str]:
        return [weight_key(n) for n in self._layer_names or ()]

    @property
    def _trainable_names(self) -> list[str]:
        weights = set(self._weight_names)
        return [n for n in self.core.names or () if n not in weights]

    def _factor_names(self) -> list[str]:
        return [f"{n}.{store}.{_MERGE_ADAPTER}" for n in self._layer_names for store in ("lora_A", "lora_B")]

    def _task_vector(self, pl_module: LightningModule) -> TaskVector:
        """τ = θ − θ₀ over the bound tensors, plus the adapter's ΔW on each wrapped weight."""
        tv = self.core.task_vector(pl_module)  # this rank's slices when the merge is sharded
        delta = lora_delta(pl_module, _MERGE_ADAPTER)
        with torch.no_grad():
            return TaskVector(
                {n: (tv[n] + self.core.local(delta[n], n).to(tv[n].device)) if n in delta else tv[n] for n in tv},
                check_finite=False,
            )

    def _zero_adapter(self, pl_module: LightningModule) -> None:
        with torch.no_grad():
            for layer in lora_layers(pl_module).values():
                layer.lora_B[_MERGE_ADAPTER].zero_()

    def merged_state_dict(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The module's state dict with the wrapped weights and trainable parameters at θ₀ + scale·merged
        and the adapter's B at zero (``"merge"`` mode).

        Raises:
            ConfigError: not ``"merge"`` mode, or no experience folded yet.
        """
        merged = self.core.whole(self._merged_tensors())  # every rank must call it when the merge is sharded
        out = dict(pl_module.state_dict())
        for n, t in merged.items():
            out[n] = t.to(device=out[n].device, dtype=out[n].dtype)
        for n in self._factor_names():
            if ".lora_B." in n:
                out[n] = torch.zeros_like(out[n])
        return out

    @contextlib.contextmanager
    def merged_weights(self, pl_module: LightningModule) -> Iterator[LightningModule]:
        """Evaluate θ₀ + scale·merged inside the block (e.g. between experiences); the weights come back after."""
        merged = self.merged_state_dict(pl_module)
        names = [*self.core.names, *self._factor_names()]
        saved = snapshot(pl_module, names, _CPU)
        write_into(pl_module, {n: merged[n] for n in names})
        try:
            yield pl_module
        finally:
            write_into(pl_module, saved)

    def _merged_tensors(self) -> dict[str, Tensor]:
        if self.mode != "merge":
            raise ConfigError("LoRAAdapters(mode='per_task') merges nothing; select an adapter with forward_by_task.")
        return self.core.merged_tensors()

    def _hand_back_merged(self, pl_module: LightningModule) -> None:
        merged = self.core.merged_tensors()
        if self.start_from == "finetuned":  # the next fit continues from the trained adapter and modules
            self._kept = snapshot(pl_module, self._trainable_names + self._factor_names(), _CPU)
        else:
            self._kept = None
        self.core.write(pl_module, merged)
        self._zero_adapter(pl_module)
        self._holds_merged = True

    def _install_start_weights(self, pl_module: LightningModule) -> None:
        """Set the weights the next experience trains from, as ``start_from`` says."""
        if self.start_from == "pretrained":
            self.core.write(pl_module, self.core.theta0)
            reset_lora(pl_module, _MERGE_ADAPTER, seed=self.seed + self.merger.num_tasks)
        elif self.start_from == "finetuned":
            if self._holds_merged:
                self.core.write(pl_module, {n: self.core.theta0[n] for n in self._weight_names})
                write_into(pl_module, self._kept)
        else:
            self.core.write(pl_module, self.core.merged_tensors())
            reset_lora(pl_module, _MERGE_ADAPTER, seed=self.seed + self.merger.num_tasks)
        self._kept = None
        self._holds_merged = False

    # -- inference ----------------------------------------------------------------------------------------
    def _route(self, key: str) -> str | None:
        known = key in self._tasks or key == self._training_adapter
        return key if known else None

    def _unlabelled(self, pl_module: LightningModule) -> contextlib.AbstractContextManager:
        return use_adapter(pl_module, None)

    def forward_by_task(self, pl_module: LightningModule, inputs: Tensor, task_labels: Any = None) -> Tensor:
        """``pl_module(inputs)`` with each sample's adapter (``"per_task"``); ``"merge"`` mode: one plain pass.

        ``"per_task"`` mode: label ``k`` selects adapter ``"k"``; a label with no
        adapter yet, or ``task_labels=None``, uses the base model (no adapter).
        With ``trainable_per_task=True`` label ``k`` also gets task k's copy of
        the ``trainable`` modules; other labels get the latest task's copy (the
        live weights while an experience trains).
        """
        if self.mode == "merge":
            # One merged model serves every label: the batch is not split.
            labels_to_keys(task_labels, inputs.shape[0])  # still refuse a label count that does not fit
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
            "layer_types": list(self.lora.layer_types),
        }

    def _saved_options(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        saved = dict(super()._saved_options(state))
        if saved.get("start_from") in START_FROM_ALIASES:  # written before "fresh" became "pretrained"
            saved["start_from"] = START_FROM_ALIASES[saved["start_from"]]
        return saved

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.core.state_dict())
        state.update(kept=self._kept, holds_merged=self._holds_merged, tasks=list(self._tasks), training_adapter=self._training_adapter)
        return state

    def _core_state(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        """The boundary core's part of a state; a format-1 state (θ₀ and merger kept by this callback) is converted."""
        if state.get("format_version", 1) >= 2:
            return state
        theta0 = state.get("theta0")
        layers = state.get("layers") if state.get("layers") is not None else self._layer_names
        trainable = _names(state.get("trainable_names", []), "trainable_names", self._owner)
        if theta0 is not None and isinstance(theta0, Mapping):
            names = list(theta0)
        elif self.mode == "merge" and layers is not None:
            names = [weight_key(n) for n in layers] + trainable
        else:
            names = None
        return {"names": names, "statistic_names": [], "theta0": theta0, "merger": state.get("merger"), "statistics_merger": None}

    @override
    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner = self._owner
        apply_shared = super()._prepare_load(state)
        finished = check_count(state.get("experiences_finished", 0), "experiences_finished", owner)
        core_state = self._core_state(state)
        layout = None
        if self._module is not None and self.core.names is not None:
            module_state = self._module.state_dict()
            layout = layout_of({n: module_state[n] for n in self.core.names})
        if self.mode == "merge" and core_state.get("theta0") is None and (finished or state.get("training_experience") is not None):
            raise CheckpointError(f"The checkpoint's {owner} (mode='merge') has no θ₀ but {finished} finished experience(s); it is damaged.")
        apply_core = self.core.prepare_load(core_state, owner, layout=layout)
        merger_state = core_state.get("merger") or {}
        folded = merger_state.get("num_tasks", 0) if isinstance(merger_state, Mapping) else 0
        if self.mode == "merge" and folded != finished:
            raise CheckpointError(
                f"The checkpoint's {owner} records {finished} finished experience(s) but its merger holds {folded}; it is damaged."
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
            apply_core()
            self._kept = kept
            self._holds_merged = holds_merged
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
            task's coefficients (default False: shared by all tasks).
        seed: seeds every random draw (default 0); the same on all ranks.
        check_ranks: as for :class:`LoRAAdapters`.

    Raises:
        ConfigError: an argument out of range (e.g. ``p > k``) or of the wrong
            type. At ``setup`` or the first boundary: DDP with one ``fit`` over
            several experiences (run one ``fit`` per experience), another
            adapter callback or ``ModelMerging`` on the Trainer.
        NoMatchingModulesError: (at ``setup``) ``target_modules`` selects nothing.
        CheckpointError: a loaded state records Share tasks that the module's
            Share layers do not hold (the module's own state was not loaded).

    Attributes:
        share: the :class:`~cl_plugin.adapters.SharedSubspace` once the first
            experience has ended (None before): ``share.tasks``,
            ``share.bytes_per_task()``, ``share.task_delta(t)``, ...
        task_module_states: with ``trainable_per_task=True``, task -> the stored
            copy of the ``trainable`` modules' state (CPU tensors).

    State (``state_dict``, ``format_version`` 2): the options above,
    ``layers``, ``lora_task`` (the experience the LoRA trains), ``share``
    (None before the first boundary, then Share's bookkeeping: ``tasks``,
    ``training_task``, ``updates``, ``p``), ``task_module_names`` and
    ``task_modules``, plus the boundary bookkeeping. Share's basis and
    coefficients are not in it: they are in the module's ``state_dict``
    (``<layer>.basis_a``, ``<layer>.coef_a.<task>``, ...), which a checkpoint
    holds anyway. States of format 1 (which held them twice) load too.

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
            layer_types=("Linear",),  # Share wraps nn.Linear layers
        )
        self.share_config = ShareConfig(k, p, explained_variance, temporary_directions, init, self.seed)
        self.share: SharedSubspace | None = None
        self._lora_task: str | None = None
        self._hook = None
        # Share's bookkeeping from a loaded state, until the module it belongs to is known.
        self._loaded_share: dict[str, Any] | None = None

    # The Share options, as attributes.
    k = property(lambda self: self.share_config.k)
    p = property(lambda self: self.share_config.p)
    explained_variance = property(lambda self: self.share_config.explained_variance)
    temporary_directions = property(lambda self: self.share_config.temporary_directions)
    init = property(lambda self: self.share_config.init)

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
            share = SharedSubspace(config=self.share_config)
            share.inject(pl_module, _exact_names_regex(self._layer_names), lora_task=self._lora_task, trainable=self.trainable)
            self.share = share
        else:
            self._store_task_modules(pl_module, self.share.training_task)
            self.share.finish_task()
        if self.check_ranks:
            check_ranks_agree(trainer, pl_module, "SharedSubspaceAdapters")

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

    def _route(self, key: str) -> str | None:
        share = self.share
        if share is None:  # LoRA phase: the LoRA's task uses it
            return _MERGE_ADAPTER if key == self._lora_task else None
        return key if key in share.tasks or key == share.training_task else None

    @contextlib.contextmanager
    def _unlabelled(self, pl_module: LightningModule) -> Iterator[None]:
        share = self.share
        if share is None:  # LoRA phase: no label uses the LoRA
            with use_adapter(pl_module, _MERGE_ADAPTER):
                yield
            return
        layers = list(share.layers.values())
        before = [layer.selection() for layer in layers]
        try:
            if share.tasks:
                share.select(None)  # the mean update of the stored tasks
            elif share.training_task is not None:
                share.select(share.training_task)
            else:
                share.disable()
            yield
        finally:
            for layer, token in zip(layers, before):
                layer.restore_selection(token)

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

    # -- resume: Share's tensors come with the module's state -----------------------------------------------
    def _share_structure_pre_hook(self, module, state_dict, prefix, *args) -> None:
        # Lightning loads the module's state before the callbacks' (and after `setup` wrapped
        # the targets in LoRA). A checkpoint written after the first boundary holds Share
        # layers there: give the module empty Share layers to load them into.
        if self.share is not None or not self._layer_names or f"{prefix}{self._layer_names[0]}.basis_a" not in state_dict:
            return
        wrap_for_loading(module, self._layer_names)

    def _check_share_layers(self, pl_module: LightningModule, saved: Mapping[str, Any]) -> None:
        """Raise unless the module's Share layers hold exactly the tasks of the saved bookkeeping."""
        owner = self._owner
        names = self._layer_names or ()
        modules = dict(pl_module.named_modules())
        plain = [n for n in names if not isinstance(modules.get(n), SharedLinear)]
        if plain:
            raise CheckpointError(
                f"The {owner} state records Share tasks {saved['tasks']}, whose basis and coefficients are in the "
                f"module's state dict, but this module holds no Share layer at {preview(plain, 3)}. Resume with "
                "`trainer.fit(..., ckpt_path=...)`, which loads the module's state too, or load the state into the "
                "callback of the module it was saved with."
            )
        held = [*saved["tasks"], *([saved["training_task"]] if saved["training_task"] else [])]
        differ = [n for n in names if list(modules[n].tasks) != held]
        if differ:
            raise CheckpointError(
                f"The {owner} state records Share tasks {held}, but the module's Share layer {differ[0]!r} holds "
                f"{list(modules[differ[0]].tasks)}: the module's state and the callback's come from different points "
                "of the stream. Load both from the same checkpoint."
            )

    def _attach_share(self, pl_module: LightningModule, saved: Mapping[str, Any]) -> SharedSubspace:
        """A SharedSubspace over the module's Share layers, with the saved bookkeeping (checked first)."""
        self._check_share_layers(pl_module, saved)
        names = self._layer_names or ()
        share = SharedSubspace(config=self.share_config)
        share.attach(pl_module, _exact_names_regex(names), training_task=saved["training_task"], updates=saved["updates"])
        return share

    def _apply_loaded(self, pl_module: LightningModule) -> None:
        saved, self._loaded_share = self._loaded_share, None
        if saved is not None:
            self.share = self._attach_share(pl_module, saved)

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
        share = None
        if self.share is not None:
            share = {"tasks": list(self.share.tasks), "training_task": self.share.training_task, "updates": self.share.updates, "p": self.share.p}
        state.update(lora_task=self._lora_task, share=share)
        return state

    @override
    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner = self._owner
        apply_shared = super()._prepare_load(state)
        lora_task = state.get("lora_task", self._lora_task)
        if lora_task is not None and not isinstance(lora_task, str):
            raise CheckpointError(f"The checkpoint's {owner} state has lora_task={lora_task!r}; expected None or a name.")
        saved = state.get("share")
        bookkeeping = None
        if saved is not None:  # format 1 held the tensors here as well; only the bookkeeping is read
            if not isinstance(saved, Mapping) or not isinstance(saved.get("tasks"), (list, tuple)):
                raise CheckpointError(f"The checkpoint's {owner} state has a damaged `share` entry.")
            tasks = _names([str(t) if isinstance(t, int) else t for t in saved["tasks"]], "share.tasks", owner)
            training = saved.get("training_task")
            if training is not None and not isinstance(training, str):
                raise CheckpointError(f"The checkpoint's {owner} state has share.training_task={training!r}; expected None or a name.")
            updates = check_count(saved.get("updates", len(tasks)), "share.updates", owner)
            bookkeeping = {"tasks": tasks, "training_task": training, "updates": updates}
        finished = state.get("experiences_finished", 0)
        stored = 0 if bookkeeping is None else len(bookkeeping["tasks"])
        if stored != finished:
            raise CheckpointError(
                f"The checkpoint's {owner} records {finished} finished experience(s) but Share holds {stored} task(s); it is damaged."
            )
        module = self._module
        if module is not None:
            if bookkeeping is not None:
                self._check_share_layers(module, bookkeeping)
            elif any(isinstance(m, SharedLinear) for m in module.modules()):
                raise ConfigError(
                    f"The checkpoint's {owner} was written before Share's first basis, but the module already holds "
                    "Share layers; resume it into a module that has not been through this stream."
                )

        def apply() -> None:
            apply_shared()
            self._lora_task = lora_task
            if bookkeeping is None:
                self.share = None
                return
            if self.share is not None:
                # Loaded into a callback that already manages Share layers (the same module): take the
                # state's bookkeeping over those layers.
                self.share = None
            self._loaded_share = bookkeeping
            if self._module is not None:
                self._apply_loaded(self._module)

        return apply
