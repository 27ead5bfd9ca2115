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

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from cl_plugin._checks import check_same_layout
from cl_plugin.errors import ConfigError, StateDictMismatchError
from cl_plugin.task_vectors import select_names


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


def floating_names(module: LightningModule, exclude: Iterable[str]) -> list[str]:
    """Names of the module's floating-point state entries, minus ``exclude`` globs."""
    state = module.state_dict()
    names = [n for n, t in state.items() if t.is_floating_point()]
    if not names:
        raise ConfigError(
            f"{type(module).__name__} has no floating-point parameters or buffers: there is nothing to merge."
        )
    return select_names(names, exclude=tuple(exclude) or None)


def snapshot(module: LightningModule, names: Iterable[str], device: torch.device) -> dict[str, Tensor]:
    """Copies of the named state entries on ``device`` (detached, never aliasing the module)."""
    state = module.state_dict()
    out = {}
    with torch.no_grad():
        for n in names:
            t = state[n].detach()
            copy = t.to(device=device, copy=True)
            out[n] = copy
    return out


def write_into(module: LightningModule, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` into the module's parameters and buffers in place.

    In place, so the optimizer's references to the parameters stay valid and
    DDP's buckets keep pointing at the same storage.
    """
    state = module.state_dict()
    with torch.no_grad():
        for n, value in tensors.items():
            state[n].copy_(value)


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
    total, norms = 0.0, 0.0
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point():
                total += float(torch.sum(p, dtype=torch.float64))
                norms += float(torch.linalg.vector_norm(p))
    return [total, norms]


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


def reset_optimizer_state(trainer: Trainer) -> None:
    """Drop every optimizer's per-parameter state (momentum, Adam moments, step counts).

    Learning-rate schedulers are left as they are.
    """
    for optimizer in trainer.optimizers:
        optimizer.state.clear()


class TaskBoundaryCallback(Callback):
    """Finds task boundaries in both ways of running a stream and calls two hooks.

    Subclasses implement :meth:`on_experience_start` (the weights the
    experience starts from) and :meth:`on_experience_end` (fold what was
    learnt), and may extend :meth:`state_dict`.
    """

    def __init__(self) -> None:
        self._training_experience: int | None = None
        self._experiences_finished = 0
        self._start_fingerprint: list[float] | None = None

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

    # -- Lightning hooks ------------------------------------------------------------
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

    def _end(self, trainer: Trainer, pl_module: LightningModule, at_fit_end: bool) -> None:
        experience = self._training_experience
        trained = self._start_fingerprint is None or parameter_fingerprint(pl_module) != self._start_fingerprint
        self._training_experience = None
        self._start_fingerprint = None
        broadcast_buffers(trainer, pl_module)
        if not trained:
            rank_zero_warn(
                f"Experience {experience} ended before any optimizer step changed a weight; "
                f"{type(self).__name__} skips it instead of folding an empty update. Check `max_epochs`, "
                "`limit_train_batches`, the learning rate, and that the experience has training data."
            )
            return
        self.on_experience_end(trainer, pl_module, experience, at_fit_end)
        self._experiences_finished += 1

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "training_experience": self._training_experience,
            "experiences_finished": self._experiences_finished,
            "start_fingerprint": self._start_fingerprint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._training_experience = state_dict.get("training_experience")
        self._experiences_finished = int(state_dict.get("experiences_finished", 0))
        self._start_fingerprint = state_dict.get("start_fingerprint")
