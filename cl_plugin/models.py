"""Backbones used by the demo and the benchmarks, built with timm.

The digits backbone is timm's ``vit_tiny_patch16_224`` shrunk to 8×8
grey-scale images: patch 4 (four patches and a class token), depth 3, width
64, 4 heads. Patch 2 was measured to give merges 5 to 10 points lower at three
to four times the cost (``shared/FACTS.md``).
"""

from __future__ import annotations

import os
from typing import Any

import timm
from torch import nn

__all__ = ["DIGITS_VIT_CONFIG", "create_digits_vit"]

#: Keyword arguments for ``timm.create_model("vit_tiny_patch16_224", ...)`` on 8×8 digits.
DIGITS_VIT_CONFIG: dict[str, Any] = dict(img_size=8, patch_size=4, in_chans=1, depth=3, embed_dim=64, num_heads=4)


def create_digits_vit(
    num_classes: int = 10, weights: str | os.PathLike | None = None, **overrides: Any
) -> nn.Module:
    """A small timm ViT for 8×8 digits; input (N, 1, 8, 8), output logits (N, num_classes).

    Args:
        num_classes: size of the classification head (default 10).
        weights: a local ``.safetensors`` (or timm-readable) file of weights for
            this architecture, loaded through timm's ``pretrained=True`` with
            ``pretrained_cfg_overlay=dict(file=...)``, the route a user's own
            weights take. ``None`` (default): random initialisation.
        **overrides: replace entries of :data:`DIGITS_VIT_CONFIG`.
    """
    config = {**DIGITS_VIT_CONFIG, **overrides}
    if weights is None:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **config)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"No weights file at {os.fspath(weights)!r}.")
    overlay = dict(
        file=os.fspath(weights),
        num_classes=num_classes,
        input_size=(config["in_chans"], config["img_size"], config["img_size"]),
        custom_load=False,
    )
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **config
    )
