"""Task boundaries in a Lightning run: the part every cl-plugin callback shares.

A stream is run in one of two ways (``ARCHITECTURE.md``, "Task boundaries"):

1. one ``trainer.fit`` over a datamodule that switches experience every
   ``epochs_per_experience`` epochs (``ContinualDataModule``): a boundary is the
   first epoch of a new experience, seen in ``on_train_epoch_start``;
2. one ``fit`` per experience in the user's own loop, with a new or a reused
   Trainer: a boundary is each ``fit``'s start and end.

Both end the experience being trained when ``fit`` ends. The experience index
comes from the datamodule's ``current_experience`` when it has one, and
otherwise counts the experiences finished so far.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from cl_plugin._checks import check_same_layout
from cl_plugin._checkpoint import (
    check_count,
    check_fingerprint,
    check_format_version,
    check_options,
)
from cl_plugin._distributed_checkpoint import extract_dtensors, has_placeholders, mesh_of, restore_placeholders
from cl_plugin.errors import CheckpointError, ConfigError, NonFiniteError, StateDictMismatchError, preview
from cl_plugin.merging.layout import cpu_group
from cl_plugin.merging.continual import snapshot, write_into  # noqa: F401  (re-exported for the callbacks)


def experience_of(trainer: Trainer, finished: int) -> int:
    """The index of the experience the current epoch trains on.

    The datamodule's ``current_experience`` when it has one; otherwise the
    number of experiences finished so far (one ``fit`` per experience).
    """
    datamodule = getattr(trainer, "datamodule", None)
    index = getattr(datamodule, "current_experience", None)
    if index is None:
        return finished
    return int(index)


def load_base_weights(source: Mapping[str, Tensor] | str | os.PathLike) -> dict[str, Tensor]:
    """Read θ₀ from a state dict or a safetensors file (never a pickle)."""
    if isinstance(source, Mapping):
        return {n: t.detach() for n, t in source.items() if isinstance(t, Tensor)}
    path = os.fspath(source)
    if not path.endswith(".safetensors"):
        raise ConfigError(
            f"`base_weights` file {path!r} is not a .safetensors file. cl-plugin does not unpickle files; "
            "convert it with safetensors.torch.save_file(state_dict, 'base.safetensors'), "
            "or pass the state dict itself."
        )
    if not os.path.exists(path):
        raise ConfigError(f"`base_weights` file {path!r} does not exist.")
    from safetensors.torch import load_file

    return load_file(path)


def check_base_weights(base: Mapping[str, Tensor], module: LightningModule, names: list[str]) -> None:
    """Raise StateDictMismatchError unless ``base`` has every merged name with the module's shape."""
    state = module.state_dict()
    missing = [n for n in names if n not in base]
    if missing:
        raise StateDictMismatchError(
            f"`base_weights` lacks {len(missing)} tensor(s) the model has: "
            + ", ".join(repr(n) for n in missing[:5])
            + (" ..." if len(missing) > 5 else "")
            + ". Save θ₀ from the same architecture, or exclude those names with `exclude=`."
        )
    check_same_layout(
        {n: state[n] for n in names}, {n: base[n] for n in names}, "`base_weights` against the model", check_dtype=False
    )


def parameter_fingerprint(module: LightningModule) -> list[float]:
    """Two sums over the trainable parameters (their sum and their norm): they change whenever a step changes a weight.

    Buffers are left out on purpose: BatchNorm updates its running statistics
    in every forward pass, with or without an optimizer step. The reductions
    read each parameter once and allocate nothing of its size.
    """
    from cl_plugin.merging.continual import is_dtensor

    sums = torch.zeros(2, dtype=torch.float64)
    sharded = False
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point():
                if is_dtensor(p):  # an FSDP2 shard: this rank's part, summed over the ranks below
                    p, sharded = p.to_local(), True
                sums[0] += float(torch.sum(p, dtype=torch.float64))
                sums[1] += float(torch.linalg.vector_norm(p))
    if sharded:
        torch.distributed.all_reduce(sums, group=cpu_group())  # a CPU tensor: not through NCCL alone
    return sums.tolist()


def broadcast_buffers(trainer: Trainer, module: LightningModule) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm running statistics).

    DDP keeps parameters identical across ranks but each rank updates its
    buffers from its own shard of the batch; DDP overwrites them with rank 0's
    only at the start of the next forward pass. A boundary happens between
    two passes, so without this the ranks would fold different task vectors.
    """
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    with torch.no_grad():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def check_ranks_agree(
    trainer: Trainer, module: torch.nn.Module, owner: str, names: Iterable[str] | None = None
) -> None:
    """Under DDP, all-gather a checksum of the module's floating-point state and raise if the ranks differ.

    ``names`` restricts the checksum to those state-dict entries (default: all
    of them). FSDP2 shards (``DTensor``) differ across ranks by design and are
    left out.
    """
    if trainer.world_size <= 1:
        return
    from cl_plugin.merging.continual import is_dtensor

    state = module.state_dict()
    chosen = state if names is None else {n: state[n] for n in names}
    tensors = [t.detach().double() for t in chosen.values() if t.is_floating_point() and not is_dtensor(t)]
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        total = total + t.sum().cpu() + t.abs().sum().cpu()
    device = next(iter(module.parameters()), total).device
    gathered = trainer.strategy.all_gather(total.to(device))
    if not torch.all(gathered == gathered.reshape(-1)[0]):
        raise RuntimeError(
            f"{owner}: the weights differ across ranks after a task boundary (checksums {gathered.tolist()}). "
            "Every rank must make the same updates at a boundary; report this with your Trainer settings."
        )


def merge_shard(trainer: Trainer) -> tuple[int, int, None] | None:
    """How the boundary core splits the merge of replicated weights: ``(rank, world, None)`` over the ranks, or None.

    Every rank folds 1/W of each tensor and holds 1/W of θ₀ and of the
    merger's state; the merged weights are all-gathered back into the
    replicated parameters. FSDP2 parameters (``DTensor``) are split as they
    are sharded, whatever this returns.
    """
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return (trainer.global_rank, trainer.world_size, None)


def refuse_unsupported_strategy(trainer: Trainer, owner: str) -> None:
    """Raise for Lightning's FSDP1 and DeepSpeed strategies: their flat parameters are not supported (yet)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ConfigError(
            f"{owner} does not run under {type(strategy).__name__}: its flattened parameter shards do not say which "
            "part of each tensor a rank holds, and a merge on them would be silently wrong. Shard with FSDP2 "
            "instead: Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)) with "
            "`fully_shard` in your `configure_model`, or use strategy='ddp'."
        )


def launches_by_spawning(trainer: Trainer) -> bool:
    """True when the strategy starts its processes by spawning or forking (``ddp_spawn``, ``ddp_fork``, ...).

    Those processes end with the ``fit``: what a callback holds in them never
    reaches the process that called ``fit``.
    """
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(getattr(trainer, "strategy", None), "launcher", None), _MultiProcessingLauncher)


def warn_if_mid_epoch_resume_is_inexact(trainer: Trainer) -> None:
    """Warn when a checkpoint written inside an epoch is resumed with a loader that cannot continue that epoch.

    Lightning then replays the epoch's order from its start and only skips as
    many batches as were done, so the resumed run trains on other batches than
    the uninterrupted one (the merge is still valid, but not bit-identical).
    """
    from cl_plugin.benchmarks.datamodule import resumes_mid_epoch

    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.current.processed == 0 or progress.is_last_batch:
        return
    if not resumes_mid_epoch(trainer.train_dataloader):
        rank_zero_warn(
            f"The checkpoint {trainer.ckpt_path!r} was written in the middle of an epoch "
            f"({progress.current.processed} batches done), and the training loader cannot continue an epoch "
            "where it stopped: Lightning restarts the epoch's order and skips that many batches, so this run "
            "will not end bit-identical to an uninterrupted one. Resume from a checkpoint written at an epoch end, "
            "or train with cl_plugin.benchmarks.ContinualDataModule (or a loader with state_dict/load_state_dict)."
        )


def reset_optimizer_state(trainer: Trainer) -> None:
    """Drop every optimizer's per-parameter state (momentum, Adam moments, step counts).

    Learning-rate schedulers are left as they are.
    """
    for optimizer in trainer.optimizers:
        optimizer.state.clear()


#: The attribute of a LightningModule naming, per callback key, the instance that folds its stream.
_STREAM_MARK = "_cl_plugin_streams"
#: token -> the callback instance (weakly held: a callback dropped by the user is not kept alive).
_STREAMS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

#: Where a callback's sharded tensors go among the model's entries of a distributed checkpoint.
DISTRIBUTED_STATE_PREFIX = "_cl_plugin."


def writes_distributed_checkpoints(trainer: Trainer) -> bool:
    """True when the strategy writes checkpoints rank by rank with ``torch.distributed.checkpoint``
    (``ModelParallelStrategy``, whose ``save_distributed_checkpoint`` defaults to True)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    return isinstance(strategy, ModelParallelStrategy) and bool(getattr(strategy, "_save_distributed_checkpoint", True))


class TaskBoundaryCallback(Callback):
    """Finds task boundaries in both ways of running a stream and calls two hooks.

    Subclasses implement :meth:`on_experience_start` (the weights the
    experience starts from) and :meth:`on_experience_end` (fold what was
    learnt), and declare what a checkpoint must agree on (:meth:`_options`,
    :attr:`_changeable_options`) and how their own state is checked and
    applied (:meth:`_prepare_load`).

    Checkpoints. The state key is the class name, never the settings, so a run
    resumed with other settings finds its state and is told what differs
    (:meth:`load_state_dict`) instead of silently starting over. One instance
    of a class per Trainer. A state saved under an older key that held the
    settings is found and loaded under the new one.
    """

    #: The checkpoint key: the public callback's name, the same for its subclasses.
    _state_name: str | None = None
    #: The version of :meth:`state_dict`'s layout this class writes and reads.
    state_format_version: int = 1
    #: Options a resumed run may change; a change is reported, not refused.
    _changeable_options: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._training_experience: int | None = None
        self._experiences_finished = 0
        self._start_fingerprint: list[float] | None = None
        self._restored_in_fit = False
        #: Model-sized state goes into the strategy's distributed checkpoint, rank by rank
        #: (ModelParallelStrategy writing a directory); set in `setup`.
        self._keep_sharded = False
        self._restored_shards = False

    # -- hooks for subclasses ---------------------------------------------------
    def on_experience_start(self, trainer: Trainer, pl_module: LightningModule, experience: int) -> None:
        """Called before the first training step of ``experience``."""

    def on_experience_end(
        self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool
    ) -> None:
        """Called after the last training step of ``experience``.

        ``at_fit_end`` is True when ``fit`` is ending (the module is handed
        back to the user), False when the next experience starts in the same
        ``fit``.
        """

    def _options(self) -> dict[str, Any]:
        """The settings a checkpoint records and a resumed run is compared with."""
        return {}

    def _saved_options(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """The options a saved state records (a subclass may fill in options older states lack)."""
        return state_dict

    def _prepare_load(self, state_dict: Mapping[str, Any]) -> Callable[[], None]:
        """Check the subclass's part of a saved state; return a function that applies it.

        Must raise (CheckpointError / ConfigError) and change nothing on a
        state it cannot take. The returned function runs before the boundary
        bookkeeping is assigned; it may raise only before it changes anything
        (e.g. a component's own atomic ``load_state_dict`` called first).
        """
        return lambda: None

    # -- Lightning hooks ------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._state_name or type(self).__qualname__

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._restored_in_fit = False
        if launches_by_spawning(trainer):
            raise ConfigError(
                f"{type(self).__name__} does not run under a strategy that spawns or forks its processes "
                f"({type(trainer.strategy).__name__} with start method "
                f"{getattr(trainer.strategy, '_start_method', '?')!r}): those processes end with `fit`, and the "
                "callback's state (θ₀, the merge, the accuracy matrices) would never come back to this process, so "
                "the next `fit` would silently start the stream over. Use strategy='ddp' (it re-runs your script in "
                "each process; guard it with `if __name__ == '__main__':`)."
            )
        refuse_unsupported_strategy(trainer, type(self).__name__)
        self._keep_sharded = writes_distributed_checkpoints(trainer)
        same = [cb for cb in trainer.callbacks if isinstance(cb, TaskBoundaryCallback) and cb.state_key == self.state_key]
        if len(same) > 1:
            raise ConfigError(self._second_instance_message(same))

    def _second_instance_message(self, same: list[Callback]) -> str:
        return (
            f"{type(self).__name__} appears {len(same)} times in the Trainer's callbacks; use one per Trainer "
            "(their checkpoint states would share one key, and each would act on the other's results)."
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A Trainer reused in the user's loop has reached its limits after the first `fit`:
        # Lightning would return at once, and the experience would silently not be trained.
        if trainer.ckpt_path is None and trainer.fit_loop.done:
            epoch, max_epochs, max_steps = trainer.current_epoch, trainer.max_epochs, trainer.max_steps
            raise ConfigError(
                f"This Trainer has already reached its limits (current_epoch={epoch}, max_epochs={max_epochs}, "
                f"global_step={trainer.global_step}, max_steps={max_steps}), so this `fit` would train nothing and "
                f"{type(self).__name__} would see no experience. Reusing one Trainer for one `fit` per experience "
                f"needs a higher limit before each `fit`, e.g. `trainer.fit_loop.max_epochs = {epoch} + "
                "<epochs per experience>`; or create a new Trainer per experience."
            )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning has put this callback's state_dict() under "callbacks". Under a
        # distributed checkpoint its model-sized tensors are DTensors of each rank's
        # rows: they join the model's entries, which every rank writes for itself,
        # and the state that rank 0 alone writes keeps a small reference to each.
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if self._keep_sharded and isinstance(state, dict) and isinstance(checkpoint.get("state_dict"), dict):
            extract_dtensors(state, checkpoint["state_dict"], DISTRIBUTED_STATE_PREFIX + self.state_key + ".")

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored_shards = False
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict):
            return
        if self.state_key not in states:
            # Earlier versions keyed the state by the settings (e.g. "ModelMerging{'method': 'magmax', ...}"):
            # take it under the new key, and let load_state_dict compare the settings.
            prefix = self.state_key + "{"
            legacy = [k for k in states if isinstance(k, str) and k.startswith(prefix)]
            if len(legacy) > 1:
                raise CheckpointError(
                    f"The checkpoint holds {len(legacy)} {self.state_key} states ({preview(legacy, 3)}); this version "
                    f"runs one {self.state_key} per Trainer and cannot tell which one to resume."
                )
            if legacy:
                states[self.state_key] = states.pop(legacy[0])
        state = states.get(self.state_key)
        if has_placeholders(state):
            self._restore_shards(trainer, pl_module, state)

    def _restore_shards(self, trainer: Trainer, pl_module: LightningModule, state: dict[str, Any]) -> None:
        """Read the state's tensors that the checkpoint keeps rank by rank (each rank its rows)."""
        mesh = mesh_of(pl_module)
        path = trainer.ckpt_path
        if mesh is None or path is None or not os.path.isdir(path):
            raise CheckpointError(
                f"The checkpoint {path!r} keeps {self.state_key}'s θ₀ and merge sharded, in a distributed checkpoint "
                "written under ModelParallelStrategy: resume it under ModelParallelStrategy with the model sharded by "
                "`fully_shard` in `configure_model`, as it was written (the number of processes may differ)."
            )
        restore_placeholders(state, path, *mesh, owner=self.state_key)
        self._restored_shards = True

    def _agree_on_load(self, error: BaseException | None) -> None:
        """After a load that read shards rank by rank: raise on every rank if any rank refused its part.

        Each rank checked only its own rows, so a damaged shard is seen by one
        rank; without this, that rank would stop while the others train on.
        """
        if not self._restored_shards:
            return
        self._restored_shards = False
        flag = torch.tensor([0 if error is None else 1])
        torch.distributed.all_reduce(flag, group=cpu_group())  # a CPU tensor: not through NCCL alone
        if int(flag) and error is None:
            raise CheckpointError(
                f"Another process refused its shards of the checkpoint's {self.state_key} state (see its error); "
                "nothing was restored. Resume from another checkpoint."
            )

    def _check_same_callback(self, pl_module: LightningModule) -> None:
        """Raise when an earlier ``fit`` of this module folded experiences with another instance of this callback.

        A loop that creates a new callback for every ``fit`` would otherwise
        start the stream over at each one (θ₀ re-taken from the fine-tuned
        weights), silently.
        """
        token = pl_module.__dict__.get(_STREAM_MARK, {}).get(self.state_key)
        if token is None or self._experiences_finished or self._restored_in_fit or self._starts_a_new_stream():
            return
        if _STREAMS.get(token) is not self:
            name = type(self).__name__
            raise ConfigError(
                f"This module was trained in an earlier `fit` under another {name} instance, which folded its "
                f"experiences; this new {name} would start the stream over from the current weights and lose them. "
                f"Pass the same {name} object to every `fit` of your loop"
                + (
                    ", or, to start a new stream from the current weights on purpose, give them as θ₀: "
                    f"{name}(..., base_weights=model.state_dict())."
                    if name == "ModelMerging"
                    else "."
                )
            )

    def _starts_a_new_stream(self) -> bool:
        """True when the callback was told to start a new stream on a module trained before (e.g. ``base_weights``)."""
        return False

    def _mark(self, pl_module: LightningModule) -> None:
        """Record on the module that this instance folds its stream (an integer token: the module stays copyable)."""
        token = id(self)
        _STREAMS[token] = self
        pl_module.__dict__.setdefault(_STREAM_MARK, {})[self.state_key] = token

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_same_callback(pl_module)
        if trainer.ckpt_path is None:
            return
        if not self._restored_in_fit and trainer.global_step > 0:
            self._resumed_without_state(trainer)
        warn_if_mid_epoch_resume_is_inexact(trainer)

    def _resumed_without_state(self, trainer: Trainer) -> None:
        """A checkpoint of a run that had already trained holds no state of this callback."""
        raise CheckpointError(
            f"The checkpoint {trainer.ckpt_path!r} (written at step {trainer.global_step}) holds no {self.state_key} "
            f"state: it was written by a run without {self.state_key}, or with weights only. Resuming it would "
            "silently start the stream over from the middle. Resume with the Trainer callbacks that wrote it, or "
            "start the stream from its beginning without `ckpt_path`."
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        experience = experience_of(trainer, self._experiences_finished)
        if self._training_experience == experience:
            return
        if self._training_experience is not None:
            self._end(trainer, pl_module, at_fit_end=False)
        self._training_experience = experience
        self.on_experience_start(trainer, pl_module, experience)
        self._start_fingerprint = parameter_fingerprint(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._training_experience is not None:
            self._end(trainer, pl_module, at_fit_end=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A fit resumed from a checkpoint written after the last epoch skips the
        # training loop, and with it on_train_end: close the pending experience here.
        if self._training_experience is not None and trainer.state.fn == "fit":
            self._end(trainer, pl_module, at_fit_end=True)

    def on_experience_diverged(
        self, trainer: Trainer, pl_module: LightningModule, experience: int, at_fit_end: bool
    ) -> None:
        """Called instead of :meth:`on_experience_end` when the trained weights hold NaN or inf.

        Nothing is folded or counted. The default raises; a subclass that can
        put the module back as it was before the experience does so, then raises.
        """
        raise NonFiniteError(
            f"{type(self).__name__}: training diverged in experience {experience}: the trainable weights hold NaN or "
            "infinite values, so nothing was folded or recorded for it. Resume from a checkpoint written before "
            "this experience (`trainer.fit(..., ckpt_path=...)`) after changing what made it diverge (a lower "
            "learning rate, gradient clipping, another precision)."
        )

    def _end(self, trainer: Trainer, pl_module: LightningModule, at_fit_end: bool) -> None:
        experience = self._training_experience
        fingerprint = parameter_fingerprint(pl_module)
        trained = self._start_fingerprint is None or fingerprint != self._start_fingerprint
        self._training_experience = None
        self._start_fingerprint = None
        broadcast_buffers(trainer, pl_module)
        if not all(math.isfinite(v) for v in fingerprint):
            self.on_experience_diverged(trainer, pl_module, experience, at_fit_end)
            return
        if not trained:
            rank_zero_warn(
                f"Experience {experience} ended before any optimizer step changed a weight; "
                f"{type(self).__name__} skips it instead of folding an empty update. Check `max_epochs`, "
                "`limit_train_batches`, the learning rate, and that the experience has training data."
            )
            return
        # Counted only once folded: a boundary that raises (e.g. diverged weights) leaves
        # the count as it was, so a retried `fit` trains the same experience again.
        self.on_experience_end(trainer, pl_module, experience, at_fit_end)
        self._experiences_finished += 1
        self._mark(pl_module)

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.state_format_version,
            **self._options(),
            "training_experience": self._training_experience,
            "experiences_finished": self._experiences_finished,
            "start_fingerprint": self._start_fingerprint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from a state written by :meth:`state_dict`.

        Everything is checked before anything changes: the format version,
        the settings against this callback's (a difference raises a
        ConfigError naming it, except for the documented
        :attr:`_changeable_options`, which are reported), the boundary
        bookkeeping, and the subclass's tensors against the model.

        Raises:
            CheckpointError: the state is damaged, of a newer format, or does not fit the model.
            ConfigError: the state was written with other settings.
        """
        owner = type(self).__name__
        try:
            if not isinstance(state_dict, Mapping):
                raise CheckpointError(f"{owner}.load_state_dict expects a mapping, got {type(state_dict).__name__}.")
            check_format_version(state_dict, owner, self.state_format_version)
            changed = check_options(self._saved_options(state_dict), self._options(), owner, self._changeable_options)
            training = check_count(state_dict.get("training_experience"), "training_experience", owner, optional=True)
            finished = check_count(state_dict.get("experiences_finished", 0), "experiences_finished", owner)
            fingerprint = check_fingerprint(state_dict.get("start_fingerprint"), "start_fingerprint", owner)
            apply = self._prepare_load(state_dict)
        except BaseException as exc:
            self._agree_on_load(exc)
            raise
        self._agree_on_load(None)
        # Every check has passed.
        apply()
        self._training_experience = training
        self._experiences_finished = finished
        self._start_fingerprint = fingerprint
        self._restored_in_fit = True
        for name, (saved, now) in changed.items():
            rank_zero_info(f"{owner}: resumed with {name}={now!r} (the checkpoint has {saved!r}).")
