"""Train a stream from a LightningCLI config: the model, the stream and the merging callback all come from YAML.

    python examples/cli/train.py fit --config examples/cli/magmax.yaml
    python examples/cli/train.py fit --config examples/cli/opcm.yaml
    python examples/cli/train.py fit --config examples/cli/ties.yaml --trainer.callbacks.init_args.method_options.top_k 0.3   # the last callback: ModelMerging

The LightningModule is written as Lightning's docs write one: ``x, y = batch``
and one validation loader. ``ContinualDataModule`` builds the benchmark from its
name and ``benchmark_options``; ``ModelMerging`` takes the merger's options as
the ``method_options`` mapping.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from cl_plugin.benchmarks import ContinualDataModule


class DigitsClassifier(L.LightningModule):
    """A small MLP on 8x8 digits.

    Args:
        hidden: width of the hidden layer (default 64).
        lr: SGD learning rate (default 0.05).
    """

    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(args=None, run: bool = True) -> LightningCLI:
    return LightningCLI(DigitsClassifier, ContinualDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
