"""``ClassIncrementalMasking``: train each experience only on its own classes' logits.

In class-incremental learning every experience brings new classes. With a
plain softmax over all classes, training on experience t pushes the logits of
every earlier class down, so each task vector rewrites the whole head. Masking
the logits of the classes outside the current experience during training
(as in Avalanche's and the MagMax code's class-incremental heads) leaves those
head rows with zero gradient: with SGD and no weight decay on the head, their
task-vector rows stay exactly zero, and a merge assembles the head class by
class. Evaluation is not masked: the model predicts over all classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from cl_plugin.errors import ConfigError, NoMatchingModulesError, did_you_mean, preview

__all__ = ["ClassIncrementalMasking"]


class ClassIncrementalMasking(Callback):
    """Mask the logits of classes outside the current experience while training.

    A forward hook on the head module replaces those logits by the dtype's
    most negative finite value, so their softmax probability and gradient are
    zero; nothing in the LightningModule changes.

    Args:
        head: name of the module that outputs the logits, as in
            ``named_modules()`` (default ``"head"``, timm's classifier).
        classes_per_experience: the classes of each experience. Default: the
            datamodule's ``classes_in_experience`` (``ContinualDataModule``).

    Raises:
        ConfigError: ``head`` is not a non-empty string, or
            ``classes_per_experience`` is not a list of lists of class indices.
        NoMatchingModulesError: (at setup) no module is named ``head``; the
            message lists module names that exist.
    """

    def __init__(self, head: str = "head", classes_per_experience: Sequence[Sequence[int]] | None = None) -> None:
        if not isinstance(head, str) or not head:
            raise ConfigError(f"`head` must be the name of the module that outputs logits, got {head!r}.")
        if classes_per_experience is not None:
            try:
                classes_per_experience = [[int(c) for c in exp] for exp in classes_per_experience]
            except (TypeError, ValueError):
                raise ConfigError(
                    "`classes_per_experience` must be a list with one list of class indices per experience, "
                    f"got {classes_per_experience!r}."
                ) from None
        self.head = head
        self.classes_per_experience = classes_per_experience
        self._mask: Tensor | None = None
        self._handle = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        modules = dict(pl_module.named_modules())
        if self.head not in modules:
            names = [n for n in modules if n]
            raise NoMatchingModulesError(
                f"ClassIncrementalMasking: no module named {self.head!r} in {type(pl_module).__name__}."
                f"{did_you_mean(self.head, names)} Modules that exist: {preview(names, 10)}."
            )
        if self._handle is None:
            self._handle = modules[self.head].register_forward_hook(self._mask_logits)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._handle is not None:
            self._handle.remove()
            self._handle = None
            self._mask = None

    def _classes(self, trainer: Trainer) -> list[int]:
        datamodule = getattr(trainer, "datamodule", None)
        experience = getattr(datamodule, "current_experience", None)
        table = self.classes_per_experience
        if table is None:
            table = getattr(datamodule, "classes_in_experience", None)
        if table is None or experience is None:
            raise ConfigError(
                "ClassIncrementalMasking needs the classes of the current experience: use a datamodule with "
                "`current_experience` and `classes_in_experience` (cl_plugin.benchmarks.ContinualDataModule), "
                "or pass classes_per_experience=[[0, 1], [2, 3], ...] and a datamodule with `current_experience`."
            )
        if not 0 <= experience < len(table):
            raise ConfigError(
                f"The current experience is {experience}, but classes are known for {len(table)} experience(s)."
            )
        return list(table[experience])

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._classes_now = self._classes(trainer)
        self._mask = None  # built at the first forward, when the number of classes is known

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mask = None
        self._classes_now = None

    def _mask_logits(self, module: nn.Module, inputs, output):
        classes = getattr(self, "_classes_now", None)
        if not module.training or classes is None or not isinstance(output, Tensor):
            return output
        n_classes = output.shape[-1]
        if self._mask is None or self._mask.shape[0] != n_classes or self._mask.device != output.device:
            if max(classes) >= n_classes:
                raise ConfigError(
                    f"ClassIncrementalMasking: the experience has class {max(classes)}, but {self.head!r} "
                    f"outputs only {n_classes} logits."
                )
            keep = torch.zeros(n_classes, dtype=torch.bool, device=output.device)
            keep[classes] = True
            self._mask = keep
        return output.masked_fill(~self._mask, torch.finfo(output.dtype).min)
