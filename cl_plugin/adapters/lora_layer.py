"""LoRA layers, one class per layer type: ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d``, ``nn.Embedding``.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
(https://arxiv.org/abs/2106.09685). Each layer computes

    y = base(x) + (alpha / r) · B(A(dropout(x)))

with the base layer frozen. The per-type rules are PEFT 0.21's
(``peft/tuners/lora/layer.py``: ``Linear``, ``Embedding``, ``_ConvNd``), so
the outputs equal PEFT's for the same A, B, alpha and r:

========================  ==========================  =========================  =====================================
layer                     A                           B                          ΔW (in the weight's layout)
========================  ==========================  =========================  =====================================
``nn.Linear``             r × d_in                    d_out × r                  (alpha/r) · B A
``Conv1D`` (GPT-2)        r × d_in                    d_out × r                  (alpha/r) · (B A)ᵀ (weight is d_in × d_out)
``nn.Conv2d``             r × C_in × k_h × k_w conv   C_out × r × 1 × 1 conv     (alpha/r) · B A, over (C_out, C_in·k_h·k_w)
``nn.Embedding``          r × n_embeddings            d × r                      (alpha/r) · (B A)ᵀ
========================  ==========================  =========================  =====================================

A Conv2d's A is a convolution with the layer's kernel size, stride and
padding, and B a 1×1 convolution, so A then B equals one convolution with
kernel ΔW. Initialisation as PEFT's ``reset_lora_parameters``: A
Kaiming-uniform (``a=√5``) and B zero, except for Embedding, where A is zero
and B standard normal; either way a new adapter leaves the model unchanged.
Dropout applies to the input of A, except for Embedding (PEFT applies none).

What PEFT allows and these layers refuse, because ΔW would then not describe
what the layer computes (and the task vectors and merges rest on ΔW): a
Conv2d with ``groups``, ``dilation`` or a ``padding_mode`` other than the
defaults (PEFT warns that it cannot merge grouped convolutions, and builds A
without the dilation), and an Embedding with ``max_norm`` (which renormalises
the weight inside the forward pass).

Plain torch only. transformers is never imported: ``Conv1D`` is recognised
when transformers is already loaded, which it is whenever a model holds one.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_plugin._checks import check_finite
from cl_plugin.adapters.config import DEFAULT_LAYER_TYPES, LoRAConfig, adapter_key
from cl_plugin.adapters.layer import AdapterLayer, compute_dtype, layer_generator
from cl_plugin.errors import ConfigError

__all__ = ["LoRALayer", "LoRALinear", "LoRAConv1D", "LoRAConv2d", "LoRAEmbedding", "lora_class_for", "lora_target_types"]


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class when transformers is loaded, else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


class LoRALayer(AdapterLayer):
    """What the LoRA layers share: ``lora_A``/``lora_B`` per adapter, scaling, merge and unmerge.

    Args:
        base: the layer to wrap (the subclass's type).
        config: a :class:`~cl_plugin.adapters.LoRAConfig` (its ``r``, ``alpha``,
            ``dropout``; already checked). Default: ``LoRAConfig(r=r, alpha=alpha, dropout=dropout)``.
        r, alpha, dropout: used when ``config`` is not given (checked then).
        adapter_name: name of the first adapter (default ``"default"``).
        seed: seed of the first adapter's initialisation (default 0).
        name: the layer's module name, mixed into the seed so that layers differ.

    State dict: the base layer's ``weight`` and ``bias`` under their own names,
    ``lora_A.<adapter>`` and ``lora_B.<adapter>`` in the base weight's dtype.
    Loading a state dict that names an adapter the layer lacks creates it first.
    """

    adapter_layer_names = ("lora_A", "lora_B")
    #: The base layer type this class wraps.
    base_type: ClassVar[type] = nn.Module
    #: The name in :data:`~cl_plugin.adapters.config.LAYER_TYPES`.
    type_name: ClassVar[str] = ""
    #: ΔW is (B A)ᵀ: the weight is stored input-major (PEFT's ``fan_in_fan_out``).
    fan_in_fan_out: ClassVar[bool] = False
    #: Whether the adapter's input goes through dropout.
    uses_dropout: ClassVar[bool] = True

    def __init__(
        self,
        base: nn.Module,
        config: LoRAConfig | None = None,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        adapter_name: str = "default",
        seed: int = 0,
        name: str = "",
    ) -> None:
        if not isinstance(base, self.base_type):
            raise ConfigError(f"{type(self).__name__} wraps an {self.base_type.__name__}, got {type(base).__name__}.")
        if config is None:
            config = LoRAConfig(r=r, alpha=alpha, dropout=dropout)
        adapter_name = adapter_key(adapter_name, "adapter_name")
        self.check_base(base, name)
        super().__init__(base, name)
        self._copy_base_attributes(base)
        self.r = config.r
        self.alpha = config.alpha
        self.dropout = config.dropout if self.uses_dropout else 0.0
        self.lora_dropout = nn.Dropout(self.dropout) if self.dropout > 0 else nn.Identity()
        self.merged_adapter: str | None = None
        self.add_adapter(adapter_name, seed=seed)
        self.set_active(adapter_name)
        self.train(base.training)  # a new Dropout starts in training mode; follow the wrapped layer

    # -- per-type parts -------------------------------------------------------------------------------
    @classmethod
    def check_base(cls, base: nn.Module, name: str) -> None:
        """Raise ConfigError for a base layer whose ΔW would not describe the adapted layer."""

    def _copy_base_attributes(self, base: nn.Module) -> None:
        raise NotImplementedError

    def _init_factors(self, a: Tensor, b: Tensor, generator: torch.Generator) -> None:
        """PEFT's initialisation: A Kaiming-uniform (``a=√5``), B zero (both float32 CPU tensors, filled in place)."""
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b.zero_()

    def to_base(self) -> nn.Module:
        """A plain layer of the wrapped type holding this layer's ``weight`` and ``bias`` (the same Parameters)."""
        raise NotImplementedError

    # -- common ------------------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.r

    def extra_repr(self) -> str:
        return (
            f"{tuple(self.weight.shape)}, r={self.r}, alpha={self.alpha:g}, adapters={list(self.adapters)}, "
            f"active={self.active_adapter!r}, merged={self.merged_adapter is not None}"
        )

    def add_adapter(self, name: str | int, *, seed: int = 0) -> None:
        """Create a fresh, frozen adapter ``name`` (PEFT's initialisation, drawn from ``seed``, the layer and the name)."""
        key = adapter_key(name)
        if self.has_adapter(key):
            raise ConfigError(f"Adapter {key!r} already exists on this layer; delete it first or pick another name.")
        self._allocate_adapter(key)
        self.reset_adapter(key, seed=seed)

    @torch.no_grad()
    def reset_adapter(self, name: str | int | None = None, *, seed: int = 0) -> None:
        """Re-draw adapter ``name`` (default: the active one) from a generator seeded by ``seed``, layer and adapter."""
        key = self._require(name)
        if self.merged_adapter == key:
            raise ConfigError(f"Adapter {key!r} is merged into the weights; call unmerge() before resetting it.")
        gen = layer_generator(seed, "lora", self.layer_name, key)
        a = torch.empty(self.lora_A[key].shape, dtype=torch.float32)
        b = torch.empty(self.lora_B[key].shape, dtype=torch.float32)
        self._init_factors(a, b, gen)
        self.lora_A[key].copy_(a)
        self.lora_B[key].copy_(b)

    def delete_adapter(self, name: str | int) -> None:
        key = self._require(name)
        if self.merged_adapter == key:
            raise ConfigError(f"Adapter {key!r} is merged into the weights; call unmerge() before deleting it.")
        super().delete_adapter(key)

    def set_active(self, name: str | int | None) -> None:
        key = None if name is None else self._require(name)
        if self.merged_adapter is not None and key != self.merged_adapter:
            raise ConfigError(
                f"Adapter {self.merged_adapter!r} is merged into the weights; call unmerge() before switching to {key!r}."
            )
        self.active_adapter = key

    def _adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    # -- ΔW -------------------------------------------------------------------------------------------------
    def factor_matrices(self, name: str | int | None = None) -> tuple[Tensor, Tensor]:
        """(B, A) of adapter ``name`` as matrices, d_out × r and r × (the rest): ΔW = scaling · B A, laid out as below."""
        key = self._require(name)
        a, b = self.lora_A[key], self.lora_B[key]
        return b.reshape(b.shape[0], self.r), a.reshape(self.r, -1)

    def matrix_to_weight(self, m: Tensor) -> Tensor:
        """The weight-shaped tensor of a matrix in B A's layout (transposed for ``fan_in_fan_out``)."""
        return (m.T if self.fan_in_fan_out else m).reshape(self.weight.shape)

    def weight_to_matrix(self, w: Tensor) -> Tensor:
        """The inverse of :meth:`matrix_to_weight`."""
        return w.T if self.fan_in_fan_out else w.reshape(w.shape[0], -1)

    @torch.no_grad()
    def delta_weight(self, name: str | int | None = None) -> Tensor:
        """ΔW of adapter ``name`` (default: the active one), shaped and typed like ``weight``."""
        b, a = self.factor_matrices(name)
        dtype = compute_dtype(a)
        m = (b.to(dtype) @ a.to(dtype)) * self.scaling
        return self.matrix_to_weight(m).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, *, safe: bool = True) -> None:
        """Add the active adapter's ΔW to ``weight``; ``forward`` then skips the adapter path."""
        if self.merged_adapter is not None:
            warnings.warn(f"Adapter {self.merged_adapter!r} is already merged; nothing to do.", stacklevel=2)
            return
        merge_layers({self.layer_name or "layer": self}, safe=safe, what="merge_lora")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter's ΔW from ``weight`` again."""
        if self.merged_adapter is None:
            warnings.warn("No adapter is merged; nothing to unmerge.", stacklevel=2)
            return
        self.weight.sub_(self.delta_weight(self.merged_adapter))
        self.merged_adapter = None

    # -- forward --------------------------------------------------------------------------------------------
    def _selected_output(self, x: Tensor) -> Tensor | None:
        if self.merged_adapter is not None:
            return None
        return super()._selected_output(x)

    def _mixed_batch_forward(self, x: Tensor, result: Tensor) -> Tensor:
        if self.merged_adapter is not None:
            raise ConfigError(
                f"{self.layer_name or 'A LoRA layer'} holds merged adapter {self.merged_adapter!r}; call "
                "unmerge_lora(model) before a batch with several task labels."
            )
        return super()._mixed_batch_forward(x, result)


def merge_layers(layers: dict[str, LoRALayer], *, safe: bool, what: str) -> None:
    """Fold each layer's active adapter into its weight, computing every ΔW once.

    With ``safe``, every merged weight is formed and checked finite before any
    layer is written (PEFT's ``safe_merge``); the checked tensors are the ones written.
    """
    inactive = [n for n, layer in layers.items() if layer.active_adapter is None]
    if inactive:
        raise ConfigError(f"{', '.join(map(repr, inactive[:5]))} have no active adapter to merge; call set_active_adapter first.")
    with torch.no_grad():
        merged = {n: layer.weight + layer.delta_weight() for n, layer in layers.items()}
        if safe:
            check_finite({f"{n}.weight": w for n, w in merged.items()}, what)
        for n, layer in layers.items():
            layer.weight.copy_(merged[n])
            layer.merged_adapter = layer.active_adapter


# -- the layer types ---------------------------------------------------------------------------------------
class LoRALinear(LoRALayer):
    """LoRA on an ``nn.Linear``: ``W₀x + b + (alpha/r)·B A dropout(x)``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> layer = LoRALinear(nn.Linear(2, 2), r=1, alpha=2)
        >>> x = torch.ones(1, 2)
        >>> torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # B = 0 at start
        True
        >>> with torch.no_grad():
        ...     _ = layer.lora_A["default"].copy_(torch.tensor([[1.0, 0.0]]))
        ...     _ = layer.lora_B["default"].copy_(torch.tensor([[1.0], [0.0]]))
        >>> layer.delta_weight()  # (2 / 1) * B @ A
        tensor([[2., 0.],
                [0., 0.]])
    """

    base_type = nn.Linear
    type_name = "Linear"

    def _copy_base_attributes(self, base: nn.Linear) -> None:
        self.in_features = base.in_features
        self.out_features = base.out_features

    def _adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (self.r, self.in_features), "lora_B": (self.out_features, self.r)}

    def _base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _adapter_forward(self, x: Tensor, key: str) -> Tensor:
        a, b = self.lora_A[key], self.lora_B[key]
        h = self.lora_dropout(x)
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        return F.linear(F.linear(h, a), b) * self.scaling

    def to_base(self) -> nn.Module:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear


class LoRAConv1D(LoRALinear):
    """LoRA on transformers' ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored d_in × d_out.

    The base output is ``x @ W + b`` computed as ``Conv1D.forward`` does
    (``torch.addmm``); the adapter is the Linear one; ΔW is transposed to the
    weight's layout (PEFT's ``fan_in_fan_out=True``).
    """

    base_type = nn.Module  # replaced by transformers' Conv1D when it is loaded (see lora_class_for)
    type_name = "Conv1D"
    fan_in_fan_out = True

    def __init__(self, base: nn.Module, config: LoRAConfig | None = None, **kwargs: Any) -> None:
        conv1d = conv1d_type()
        if conv1d is None or not isinstance(base, conv1d):
            raise ConfigError(f"LoRAConv1D wraps transformers' Conv1D, got {type(base).__name__}.")
        super().__init__(base, config, **kwargs)

    def _copy_base_attributes(self, base: nn.Module) -> None:
        self.in_features, self.out_features = base.weight.shape
        self.nf = base.nf

    def _base_forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)

    def to_base(self) -> nn.Module:
        with torch.device("meta"):
            layer = conv1d_type()(self.nf, self.in_features)
        layer.weight = self.weight
        layer.bias = self.bias
        return layer


class LoRAConv2d(LoRALayer):
    """LoRA on an ``nn.Conv2d``: A a convolution with the layer's kernel, stride and padding, B a 1×1 convolution.

    Raises:
        ConfigError: the convolution has ``groups``, ``dilation`` or a
            ``padding_mode`` other than the defaults.

    Example:
        >>> layer = LoRAConv2d(nn.Conv2d(2, 3, 3, padding=1), r=2, alpha=2)
        >>> layer.lora_A["default"].shape, layer.lora_B["default"].shape
        (torch.Size([2, 2, 3, 3]), torch.Size([3, 2, 1, 1]))
        >>> with torch.no_grad():
        ...     _ = layer.lora_B["default"].normal_()
        >>> x = torch.randn(1, 2, 5, 5)
        >>> expected = F.conv2d(x, layer.weight + layer.delta_weight(), layer.bias, padding=1)
        >>> torch.allclose(layer(x), expected, atol=1e-5)
        True
    """

    base_type = nn.Conv2d
    type_name = "Conv2d"

    @classmethod
    def check_base(cls, base: nn.Conv2d, name: str) -> None:
        odd = []
        if base.groups != 1:
            odd.append(f"groups={base.groups}")
        if tuple(base.dilation) != (1, 1):
            odd.append(f"dilation={tuple(base.dilation)}")
        if base.padding_mode != "zeros":
            odd.append(f"padding_mode={base.padding_mode!r}")
        if odd:
            raise ConfigError(
                f"LoRA on Conv2d {name or ''!r} with {', '.join(odd)} is not supported: its low-rank update would not be "
                "the ΔW that merging and task vectors use (PEFT cannot merge it either). Add it to `exclude_modules`."
            )

    def _copy_base_attributes(self, base: nn.Conv2d) -> None:
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels
        self.kernel_size = tuple(base.kernel_size)
        self.stride = tuple(base.stride)
        self.padding = base.padding if isinstance(base.padding, str) else tuple(base.padding)

    def _adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (self.r, self.in_channels, *self.kernel_size), "lora_B": (self.out_channels, self.r, 1, 1)}

    def _base_forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def _adapter_forward(self, x: Tensor, key: str) -> Tensor:
        a, b = self.lora_A[key], self.lora_B[key]
        h = self.lora_dropout(x)
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        return F.conv2d(F.conv2d(h, a, None, self.stride, self.padding), b) * self.scaling

    def to_base(self) -> nn.Module:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            bias=self.bias is not None, device="meta",
        )
        conv.weight = self.weight
        conv.bias = self.bias
        return conv


class LoRAEmbedding(LoRALayer):
    """LoRA on an ``nn.Embedding``: ``E₀[x] + (alpha/r)·(Aᵀ)[x] Bᵀ``, with A zero and B normal at the start (PEFT's).

    Raises:
        ConfigError: the embedding has ``max_norm`` (its forward renormalises the weight in place).

    Example:
        >>> layer = LoRAEmbedding(nn.Embedding(5, 3), r=2, alpha=2)
        >>> ids = torch.tensor([[0, 4]])
        >>> with torch.no_grad():
        ...     _ = layer.lora_A["default"].normal_()
        >>> torch.allclose(layer(ids), F.embedding(ids, layer.weight + layer.delta_weight()))
        True
    """

    base_type = nn.Embedding
    type_name = "Embedding"
    fan_in_fan_out = True
    uses_dropout = False

    @classmethod
    def check_base(cls, base: nn.Embedding, name: str) -> None:
        if base.max_norm is not None:
            raise ConfigError(
                f"LoRA on Embedding {name or ''!r} with max_norm={base.max_norm} is not supported: its forward pass "
                "renormalises the weight in place. Add it to `exclude_modules`."
            )

    def _copy_base_attributes(self, base: nn.Embedding) -> None:
        self.num_embeddings = base.num_embeddings
        self.embedding_dim = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse

    def _adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (self.r, self.num_embeddings), "lora_B": (self.embedding_dim, self.r)}

    def _init_factors(self, a: Tensor, b: Tensor, generator: torch.Generator) -> None:
        a.zero_()
        b.normal_(generator=generator)

    def _embed(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(x, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)

    def _base_forward(self, x: Tensor) -> Tensor:
        return self._embed(x, self.weight)

    def _adapter_forward(self, x: Tensor, key: str) -> Tensor:
        a, b = self.lora_A[key], self.lora_B[key]
        return (self._embed(x, a.T) @ b.T) * self.scaling

    def to_base(self) -> nn.Module:
        embedding = nn.Embedding(
            self.num_embeddings, self.embedding_dim, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse, device="meta",
        )
        embedding.weight = self.weight
        return embedding


# -- dispatch ----------------------------------------------------------------------------------------------
_BY_NAME: dict[str, type[LoRALayer]] = {
    "Linear": LoRALinear,
    "Conv1D": LoRAConv1D,
    "Conv2d": LoRAConv2d,
    "Embedding": LoRAEmbedding,
}


def lora_target_types(layer_types=DEFAULT_LAYER_TYPES) -> tuple[type, ...]:
    """The module classes ``layer_types`` names (``Conv1D`` only when transformers is loaded)."""
    out = []
    for name in layer_types:
        base = conv1d_type() if name == "Conv1D" else _BY_NAME[name].base_type
        if base is not None:
            out.append(base)
    return tuple(out)


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that wraps ``module`` (None: no LoRA layer for its type)."""
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return LoRAConv1D
    for cls in (LoRALinear, LoRAConv2d, LoRAEmbedding):
        if isinstance(module, cls.base_type):
            return cls
    return None
