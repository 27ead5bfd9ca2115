"""LoRA: trainable low-rank updates next to frozen ``nn.Linear`` weights.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
(https://arxiv.org/abs/2106.09685). A wrapped layer computes

    y = W₀x + b + (alpha / r) · B A · dropout(x),    A ∈ R^{r×d_in}, B ∈ R^{d_out×r},

with W₀ and b frozen. A starts Kaiming-uniform (``a=√5``, i.e. U(±1/√d_in)) and
B at zero, so a fresh adapter leaves the model unchanged; these are the
initialisation and scaling of HuggingFace PEFT (``peft/tuners/lora/layer.py``,
``LoraLayer.reset_lora_parameters`` and ``update_layer``), whose saved adapters
:func:`load_lora` reads (``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight`` keys, ``r``/``lora_alpha``/``use_rslora``/``rank_pattern``/
``alpha_pattern`` from ``adapter_config.json``).

What the continual-learning callbacks use at a task boundary:

- :func:`lora_delta` returns ΔW = (alpha/r)·B A of every wrapped layer as a
  :class:`~cl_plugin.TaskVector` keyed by the weight's name in the *original*
  model (``blocks.0.attn.qkv.weight``), so it feeds any merger and
  ``TaskVector.apply_to`` on the un-adapted model reproduces the adapted one.
- :func:`reset_lora` draws a fresh adapter from a seeded generator (the same on
  every rank); :func:`load_lora_delta` writes a merged ΔW back, into the
  adapter (best rank-r fit) or into the base weights (exact).
- Per-task adapters: :func:`add_adapter`, :func:`set_active_adapter`,
  :func:`use_adapter` and :func:`forward_by_task` keep one adapter per task and
  pick one by task label. A forward pass uses one adapter for the whole batch;
  :func:`forward_by_task` splits a batch with mixed labels into one pass per label.
- Saved state: the layers are ordinary modules, so ``model.state_dict()``
  holds every adapter (``<module>.lora_A.<adapter>``) and loading a state dict
  re-creates adapters it names; :func:`save_lora`/:func:`load_lora` (in
  :mod:`cl_plugin.adapters.io`, importable from here too) write and read
  PEFT's adapter format.

Notes on the layout:

- The base ``weight`` and ``bias`` stay attributes of the wrapper with their
  original names, so the model's state-dict keys for them do not change
  (PEFT moves them to ``<module>.base_layer.weight``; we do not).
- timm's ViT fuses q, k and v into one ``qkv`` Linear (``d → 3d``); LoRA on
  ``qkv`` therefore adapts the query, key and value projections together with a
  single rank-r update (PEFT on a HuggingFace ViT adapts ``query`` and ``value``
  separately). Typical timm targets: ``["qkv", "proj", "fc1", "fc2"]``
  (:data:`VIT_TARGET_MODULES`); ``proj`` does not reach ``patch_embed.proj``,
  which is a ``Conv2d``.
- DDP: only the active adapter is trainable; every other adapter has
  ``requires_grad=False``, so DDP's reducer never waits for a gradient that an
  unused adapter cannot produce. Change the trainable adapter only between
  ``fit`` calls (DDP records the trainable set when it wraps the model).
- Merged state is not part of ``state_dict`` (as in PEFT): save checkpoints
  before :func:`merge_lora` or after :func:`unmerge_lora`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_plugin._checks import check_finite
from cl_plugin.adapters.matching import Patterns, match_modules
from cl_plugin.errors import ConfigError, NoMatchingModulesError, StateDictMismatchError, preview
from cl_plugin.task_vectors import TaskVector

__all__ = [
    "VIT_TARGET_MODULES",
    "InjectionSummary",
    "LoRALinear",
    "inject_lora",
    "lora_layers",
    "add_adapter",
    "delete_adapter",
    "adapter_names",
    "set_active_adapter",
    "active_adapter",
    "use_adapter",
    "forward_by_task",
    "reset_lora",
    "lora_delta",
    "load_lora_delta",
    "merge_lora",
    "unmerge_lora",
    "unload_lora",
    "adapter_bytes",
    "lora_state_dict",
    "save_lora",
    "load_lora",
]

#: The Linear layers of a timm VisionTransformer block.
VIT_TARGET_MODULES = ("qkv", "proj", "fc1", "fc2")


# -- small shared helpers (also used by share.py) ---------------------------------
def adapter_key(name: object, what: str = "adapter") -> str:
    """Normalise an adapter or task name to the string used as a parameter key.

    Integers (and 0-d integer tensors) become their decimal string, so task
    label ``3`` and ``"3"`` name the same adapter.
    """
    if isinstance(name, Tensor) and name.numel() == 1 and not name.is_floating_point():
        name = int(name.item())
    if isinstance(name, bool):
        raise ConfigError(f"`{what}` must be a string or an int, got {name!r}.")
    if isinstance(name, numbers.Integral):
        return str(int(name))
    if not isinstance(name, str):
        raise ConfigError(f"`{what}` must be a string or an int, got {type(name).__name__} {name!r}.")
    if not name or "." in name:
        raise ConfigError(f"`{what}` must be a non-empty name without '.', got {name!r}.")
    return name


def layer_generator(seed: int, *parts: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and names, identical on every process.

    Python's ``hash`` is salted per process; CRC32 is not, so every DDP rank
    draws the same numbers for the same layer.
    """
    key = ":".join((str(int(seed)), *parts)).encode()
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(key))


def check_int(value: object, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ConfigError(f"`{what}` must be an int >= {low}, got {value!r}.")
    return int(value)


def check_float(value: object, what: str, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"`{what}` must be a real number in {lo}{low:g}, {high:g}{hi}, got {value!r}.")
    return float(value)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.get_submodule(name)`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_parent_calls_forward(model: nn.Module, names: Sequence[str], what: str) -> None:
    """Refuse layers whose parent reads ``.weight`` directly instead of calling them.

    ``nn.MultiheadAttention`` passes ``out_proj.weight`` to a functional kernel:
    a wrapper around ``out_proj`` would be ignored without any error.
    """
    bad = []
    for name in names:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            bad.append(name)
    if bad:
        raise ConfigError(
            f"`{what}` selects {preview(bad)}, the output projection of nn.MultiheadAttention, which reads "
            "its weight directly and never calls the layer: an adapter there would have no effect. "
            "Add it to `exclude_modules`."
        )


def freeze_except(model: nn.Module, trainable_modules: Sequence[str], frozen_ids: set[int]) -> None:
    """Freeze every parameter, then unfreeze the named modules' parameters (minus ``frozen_ids``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trainable_modules:
        for p in model.get_submodule(name).parameters():
            if id(p) not in frozen_ids:
                p.requires_grad_(True)


@dataclass(frozen=True)
class InjectionSummary:
    """What :func:`inject_lora` (or ``SharedSubspace.inject``) changed.

    Attributes:
        wrapped: names of the wrapped layers, in module order.
        trainable_modules: names of the modules left trainable in full (``trainable=``).
        trainable_parameters: number of trainable elements after injection.
        total_parameters: number of elements of all parameters.
    """

    wrapped: tuple[str, ...]
    trainable_modules: tuple[str, ...]
    trainable_parameters: int
    total_parameters: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return (
            f"wrapped {len(self.wrapped)} layer(s); trainable params: {self.trainable_parameters:,} || "
            f"all params: {self.total_parameters:,} || trainable%: {pct:.4f}"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _compute_dtype(t: Tensor) -> torch.dtype:
    # 16-bit matmuls on CPU are slow and lose precision; compute in float32 there (as PEFT does).
    return torch.float32 if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


# -- the layer -------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """An ``nn.Linear`` with frozen weights and one or more LoRA adapters.

    The wrapper takes over the base layer's ``weight`` and ``bias`` Parameters
    (same objects, same state-dict names) and adds, per adapter name,
    ``lora_A.<name>`` (r × in_features) and ``lora_B.<name>`` (out_features × r).
    One adapter is *active* (used by ``forward``); any number may exist.

    Args:
        base: the ``nn.Linear`` to wrap.
        r: rank of every adapter of this layer (default 8).
        alpha: scaling numerator; the update is multiplied by ``alpha / r`` (default 16).
        dropout: dropout probability on the adapter's input (default 0.0).
        adapter_name: name of the first adapter (default ``"default"``).
        seed: seed of the first adapter's initialisation (default 0).
        name: the layer's module name, mixed into the seed so that layers differ.

    State dict: ``weight``, ``bias`` (the base layer's), ``lora_A.<adapter>``,
    ``lora_B.<adapter>`` in the base weight's dtype. Loading a state dict that
    names an adapter this layer lacks creates it first.

    Raises:
        ConfigError: ``base`` is not an ``nn.Linear``, or an argument is out of range.

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

    def __init__(
        self,
        base: nn.Linear,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        adapter_name: str = "default",
        seed: int = 0,
        name: str = "",
    ) -> None:
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.")
        r = check_int(r, "r")
        alpha = check_float(alpha, "alpha", 0.0, math.inf, low_open=True, high_open=True)
        dropout = check_float(dropout, "dropout", 0.0, 1.0, low_open=False, high_open=True)
        adapter_name = adapter_key(adapter_name, "adapter_name")
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.layer_name = name
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.add_adapter(adapter_name, seed=seed)
        self.set_active(adapter_name)
        self.train(base.training)  # a new Dropout starts in training mode; follow the wrapped layer

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.r

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.lora_A.keys())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"adapters={list(self.adapters)}, active={self.active_adapter!r}, merged={self.merged_adapter is not None}"
        )

    def _require(self, name: str | None) -> str:
        key = self.active_adapter if name is None else adapter_key(name)
        if key is None:
            raise ConfigError("No adapter is active on this layer; name one with `adapter=`.")
        if key not in self.lora_A:
            raise ConfigError(f"Unknown adapter {key!r}; this layer has {list(self.adapters)}.")
        return key

    # -- adapters ----------------------------------------------------------------------
    def add_adapter(self, name: str, *, seed: int = 0) -> None:
        """Create a fresh, frozen adapter ``name`` (A Kaiming-uniform, B zero)."""
        key = adapter_key(name)
        if key in self.lora_A:
            raise ConfigError(f"Adapter {key!r} already exists on this layer; delete it first or pick another name.")
        dtype = self.weight.dtype if self.weight.is_floating_point() else torch.float32
        factory = {"device": self.weight.device, "dtype": dtype}
        self.lora_A[key] = nn.Parameter(torch.empty(self.r, self.in_features, **factory), requires_grad=False)
        self.lora_B[key] = nn.Parameter(torch.empty(self.out_features, self.r, **factory), requires_grad=False)
        self.reset_adapter(key, seed=seed)

    def delete_adapter(self, name: str) -> None:
        key = self._require(name)
        if self.merged_adapter == key:
            raise ConfigError(f"Adapter {key!r} is merged into the weights; call unmerge() before deleting it.")
        del self.lora_A[key]
        del self.lora_B[key]
        if self.active_adapter == key:
            self.active_adapter = None

    @torch.no_grad()
    def reset_adapter(self, name: str | None = None, *, seed: int = 0) -> None:
        """Re-draw A (Kaiming-uniform, ``a=√5``) from a generator seeded by ``seed``, layer and adapter; zero B."""
        key = self._require(name)
        if self.merged_adapter == key:
            raise ConfigError(f"Adapter {key!r} is merged into the weights; call unmerge() before resetting it.")
        gen = layer_generator(seed, "lora", self.layer_name, key)
        a = torch.empty(self.r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        self.lora_A[key].copy_(a)
        self.lora_B[key].zero_()

    def set_active(self, name: str | None) -> None:
        """Use adapter ``name`` in ``forward`` (``None``: the base layer alone). Does not change ``requires_grad``."""
        key = None if name is None else self._require(name)
        if self.merged_adapter is not None and key != self.merged_adapter:
            raise ConfigError(
                f"Adapter {self.merged_adapter!r} is merged into the weights; call unmerge() before switching to {key!r}."
            )
        self.active_adapter = key

    def set_trainable(self, name: str | None) -> None:
        """Make adapter ``name`` the only trainable one (``None``: freeze every adapter)."""
        key = None if name is None else self._require(name)
        for n in self.adapters:
            self.lora_A[n].requires_grad_(n == key)
            self.lora_B[n].requires_grad_(n == key)

    def get_selection(self) -> str | None:
        return self.active_adapter

    def set_selection(self, state: str | None) -> None:
        self.set_active(state)

    # -- weights -----------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, name: str | None = None) -> Tensor:
        """ΔW = (alpha/r)·B A of adapter ``name`` (default: the active one), in the weight's dtype."""
        key = self._require(name)
        a, b = self.lora_A[key], self.lora_B[key]
        dtype = _compute_dtype(a)
        delta = (b.to(dtype) @ a.to(dtype)) * self.scaling
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, *, safe: bool = True) -> None:
        """Add the active adapter's ΔW to ``weight``; ``forward`` then skips the adapter path."""
        if self.merged_adapter is not None:
            warnings.warn(f"Adapter {self.merged_adapter!r} is already merged; nothing to do.", stacklevel=2)
            return
        key = self._require(None)
        delta = self.delta_weight(key)
        if safe:
            check_finite({f"{self.layer_name or 'layer'}.weight": self.weight + delta}, "merge_lora")
        self.weight.add_(delta)
        self.merged_adapter = key

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter's ΔW from ``weight`` again."""
        if self.merged_adapter is None:
            warnings.warn("No adapter is merged; nothing to unmerge.", stacklevel=2)
            return
        self.weight.sub_(self.delta_weight(self.merged_adapter))
        self.merged_adapter = None

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        result = F.linear(x, self.weight, self.bias)
        key = self.active_adapter
        if key is None or self.merged_adapter is not None:
            return result
        a, b = self.lora_A[key], self.lora_B[key]
        h = self.lora_dropout(x)
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        return result + (F.linear(F.linear(h, a), b) * self.scaling).to(result.dtype)

    # -- state dict ------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Create adapters that the state dict names but this layer lacks, so a checkpoint
        # of a per-task run loads into a freshly injected model.
        head = prefix + "lora_A."
        for key in list(state_dict.keys()):
            if key.startswith(head):
                name = key[len(head) :]
                if name and "." not in name and name not in self.lora_A:
                    self.add_adapter(name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


# -- model-level functions ---------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_layers(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise NoMatchingModulesError(
            f"{type(model).__name__} has no LoRA layers. Call inject_lora(model, target_modules=...) first."
        )
    return layers


def inject_lora(
    model: nn.Module,
    target_modules: Patterns,
    *,
    exclude_modules: Patterns | None = None,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    trainable: Patterns = (),
    adapter_name: str = "default",
    seed: int = 0,
) -> InjectionSummary:
    """Wrap the matching ``nn.Linear`` layers of ``model`` in place with :class:`LoRALinear`.

    Afterwards only the new adapters and the modules named in ``trainable``
    require gradients; every other parameter is frozen.

    Args:
        model: a timm model, or any torch module.
        target_modules: which Linear layers to wrap: a regex on the full module
            name, or a list of names / dotted suffixes (see
            :mod:`cl_plugin.adapters.matching`). For timm ViTs:
            :data:`VIT_TARGET_MODULES`.
        exclude_modules: layers never to wrap (same rules, checked first).
        r: adapter rank (default 8).
        alpha: the update is scaled by ``alpha / r`` (default 16).
        dropout: dropout on the adapter input (default 0.0).
        trainable: modules (of any type) to train in full, e.g. ``["head"]``.
            The base weights of wrapped layers inside them stay frozen.
        adapter_name: name of the adapter created on every layer (default ``"default"``).
        seed: seed of the adapters' initialisation (default 0); every layer
            derives its own generator from it and its name.

    Returns:
        An :class:`InjectionSummary`.

    Raises:
        ConfigError: an argument is out of range; a layer is both wrapped and in
            ``trainable``; a target is ``nn.MultiheadAttention.out_proj``.
        NoMatchingModulesError: a pattern set selects nothing (the message lists
            the patterns and up to 10 Linear names that exist).

    Nothing is changed in ``model`` when an error is raised.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> inject_lora(net, ["0"], r=1, trainable=["2"]).wrapped
        ('0',)
        >>> [n for n, p in net.named_parameters() if p.requires_grad]
        ['0.lora_A.default', '0.lora_B.default', '2.weight', '2.bias']
    """
    r = check_int(r, "r")
    check_float(alpha, "alpha", 0.0, math.inf, low_open=True, high_open=True)
    check_float(dropout, "dropout", 0.0, 1.0, low_open=False, high_open=True)
    adapter_name = adapter_key(adapter_name, "adapter_name")
    seed = check_int(seed, "seed", low=0)
    result = match_modules(model, target_modules, exclude_modules, module_types=(nn.Linear,), what="target_modules")
    trainable_names: tuple[str, ...] = ()
    if isinstance(trainable, str) or trainable:
        trainable_names = match_modules(model, trainable, None, module_types=None, what="trainable").matched
    both = sorted(set(trainable_names) & set(result.matched))
    if both:
        raise ConfigError(
            f"{preview(both)} is both in `target_modules` and in `trainable`: a wrapped layer keeps its weight "
            "frozen. Remove it from one of them (e.g. exclude_modules=['head'] to train the head in full)."
        )
    check_parent_calls_forward(model, result.matched, "target_modules")
    # -- all checks passed; now change the model --
    for name in result.matched:
        base = model.get_submodule(name)
        layer = LoRALinear(base, r=r, alpha=alpha, dropout=dropout, adapter_name=adapter_name, seed=seed, name=name)
        replace_module(model, name, layer)
    layers = lora_layers(model)
    frozen = {id(p) for layer in layers.values() for p in (layer.weight, layer.bias) if p is not None}
    freeze_except(model, trainable_names, frozen)
    for name in result.matched:
        layers[name].set_trainable(adapter_name)
    trainable_count, total = count_parameters(model)
    return InjectionSummary(result.matched, trainable_names, trainable_count, total)


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The adapter names present on every LoRA layer of ``model``."""
    layers = _require_layers(model)
    common = set.intersection(*(set(layer.adapters) for layer in layers.values()))
    first = next(iter(layers.values()))
    return tuple(n for n in first.adapters if n in common)


def add_adapter(model: nn.Module, name: str, *, seed: int = 0) -> None:
    """Create a fresh, frozen adapter ``name`` on every LoRA layer (for per-task adapters).

    Make it the trained one with :func:`set_active_adapter`.
    """
    layers = _require_layers(model)
    key = adapter_key(name)
    clash = [n for n, layer in layers.items() if key in layer.lora_A]
    if clash:
        raise ConfigError(f"Adapter {key!r} already exists on {preview(clash)}; pick another name.")
    for layer in layers.values():
        layer.add_adapter(key, seed=seed)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every LoRA layer."""
    layers = _require_layers(model)
    key = adapter_key(name)
    missing = [n for n, layer in layers.items() if key not in layer.lora_A]
    if missing:
        raise ConfigError(f"Adapter {key!r} does not exist on {preview(missing)}; adapters: {list(adapter_names(model))}.")
    for layer in layers.values():
        layer.delete_adapter(key)


def set_active_adapter(model: nn.Module, name: str | None, *, trainable: bool = True) -> None:
    """Use adapter ``name`` on every LoRA layer (``None``: base model only).

    With ``trainable=True`` (default) ``name`` also becomes the only trainable
    adapter and every other adapter is frozen, which is what DDP needs; use
    ``trainable=False`` (or :func:`use_adapter`) to evaluate with another
    adapter without touching ``requires_grad``.
    """
    layers = _require_layers(model)
    key = None if name is None else adapter_key(name)
    if key is not None:
        missing = [n for n, layer in layers.items() if key not in layer.lora_A]
        if missing:
            raise ConfigError(
                f"Adapter {key!r} does not exist on {preview(missing)}; adapters: {list(adapter_names(model))}. "
                "Create it with add_adapter(model, name)."
            )
    merged = [n for n, layer in layers.items() if layer.merged_adapter is not None and layer.merged_adapter != key]
    if merged:
        raise ConfigError(f"{preview(merged)} hold a merged adapter; call unmerge_lora(model) before switching.")
    for layer in layers.values():
        layer.set_active(key)
        if trainable:
            layer.set_trainable(key)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter every LoRA layer uses (raises if the layers disagree)."""
    layers = _require_layers(model)
    actives = {layer.active_adapter for layer in layers.values()}
    if len(actives) != 1:
        raise ConfigError(f"The LoRA layers use different adapters: {sorted(map(str, actives))}.")
    return actives.pop()


def _selectable_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if hasattr(m, "get_selection") and hasattr(m, "set_selection")]
    if not layers:
        raise NoMatchingModulesError(
            f"{type(model).__name__} has no adapter layers (LoRALinear or SharedLinear); inject adapters first."
        )
    return layers


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | int | None) -> Iterator[None]:
    """Within the block, every adapter layer (LoRA or Share) uses adapter/task ``name``.

    The previous selection is restored on exit; ``requires_grad`` is not touched.
    """
    layers = _selectable_layers(model)
    key = None if name is None else adapter_key(name, "task label")
    before = [layer.get_selection() for layer in layers]
    try:
        for layer in layers:
            layer.set_active(key)
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.set_selection(state)


def forward_by_task(model: nn.Module, inputs: Tensor, task_labels: Tensor | Sequence[int | str] | int | str) -> Tensor:
    """Run ``model`` with the adapter named by each sample's task label.

    One forward pass uses one adapter for the whole batch. When the labels are
    all equal this is a single pass; otherwise the batch is split into one
    pass per distinct label (in order of first appearance) and the outputs are
    put back in the original order. Meant for evaluation: in training mode,
    layers that use batch statistics (BatchNorm) would see the sub-batches.

    Args:
        model: a model with LoRA or Share layers.
        inputs: a tensor whose first dimension is the batch.
        task_labels: one label for the batch, or one per sample (tensor or sequence).

    Returns:
        The model's output, a tensor whose first dimension is the batch.

    Raises:
        ConfigError: the number of labels differs from the batch size, or the
            model's output is not a batch-first tensor.
    """
    if isinstance(task_labels, (str, numbers.Integral)) or (isinstance(task_labels, Tensor) and task_labels.dim() == 0):
        with use_adapter(model, task_labels):
            return model(inputs)
    labels = task_labels.tolist() if isinstance(task_labels, Tensor) else list(task_labels)
    keys = [adapter_key(label, "task label") for label in labels]
    if len(keys) != inputs.shape[0]:
        raise ConfigError(f"Got {len(keys)} task labels for a batch of {inputs.shape[0]}; pass one per sample.")
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == 1:
        with use_adapter(model, distinct[0]):
            return model(inputs)
    out: Tensor | None = None
    for key in distinct:
        index = torch.tensor([i for i, k in enumerate(keys) if k == key], device=inputs.device)
        with use_adapter(model, key):
            part = model(inputs.index_select(0, index))
        if not isinstance(part, Tensor) or part.shape[0] != index.numel():
            raise ConfigError("forward_by_task needs a model whose output is a batch-first tensor.")
        if out is None:
            out = part.new_empty((inputs.shape[0], *part.shape[1:]))
        out[index] = part
    return out


def reset_lora(model: nn.Module, adapter: str | None = None, *, seed: int = 0) -> None:
    """Fresh A (seeded Kaiming-uniform) and zero B for ``adapter`` (default: the active one) on every layer."""
    layers = _require_layers(model)
    for layer in layers.values():
        layer._require(adapter)
        if layer.merged_adapter is not None:
            raise ConfigError("An adapter is merged into the weights; call unmerge_lora(model) before resetting.")
    for layer in layers.values():
        layer.reset_adapter(adapter, seed=seed)


def lora_delta(model: nn.Module, adapter: str | None = None) -> TaskVector:
    """ΔW = (alpha/r)·B A of every LoRA layer, as a task vector over the wrapped weights.

    Keys are the weights' names in the model without adapters
    (``blocks.0.attn.qkv.weight``), so ``lora_delta(m).apply_to(original)``
    gives the adapted model and the result feeds any merger. The tensors are
    new (detached) and in the base weights' dtype.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> _ = inject_lora(net, ["0"], r=1)
        >>> list(lora_delta(net))
        ['0.weight']
    """
    layers = _require_layers(model)
    return TaskVector({f"{name}.weight" if name else "weight": layer.delta_weight(adapter) for name, layer in layers.items()})


def _delta_to_layers(model: nn.Module, delta: Mapping[str, Tensor], what: str) -> dict[str, tuple[LoRALinear, Tensor]]:
    layers = _require_layers(model)
    by_key = {(f"{n}.weight" if n else "weight"): (n, layer) for n, layer in layers.items()}
    unknown = [k for k in delta if k not in by_key]
    if unknown:
        raise StateDictMismatchError(
            f"{what}: {len(unknown)} name(s) are not weights of LoRA layers: {preview(unknown)}. "
            f"The LoRA weights are: {preview(list(by_key), 5)}."
        )
    missing = [k for k in by_key if k not in delta]
    if missing:
        raise StateDictMismatchError(
            f"{what}: no ΔW for {len(missing)} LoRA layer(s): {preview(missing)}. Pass a task vector over all wrapped "
            "weights (e.g. from lora_delta or a merger fed with lora_delta)."
        )
    out = {}
    for key, (name, layer) in by_key.items():
        t = delta[key]
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(layer.weight.shape):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise StateDictMismatchError(f"{what}: {key!r} has shape {shape}, the layer's weight is {tuple(layer.weight.shape)}.")
        out[name] = (layer, t)
    check_finite({k: delta[k] for k in delta}, what)
    return out


@torch.no_grad()
def load_lora_delta(
    model: nn.Module, delta: Mapping[str, Tensor], adapter: str | None = None, *, into: str = "adapter"
) -> dict[str, float]:
    """Write a ΔW per LoRA layer (e.g. a merged task vector) back into the model.

    Args:
        model: a model with LoRA layers.
        delta: name -> ΔW over the wrapped weights (the keys of :func:`lora_delta`).
        adapter: which adapter receives it with ``into="adapter"`` (default: the active one).
        into: ``"adapter"``: set B, A to the best rank-r fit of ΔW (truncated
            SVD, split as B = U√S, A = √S Vᵀ, divided by alpha/r); exact when
            rank(ΔW) ≤ r. Directions beyond rank(ΔW) start at zero in both
            factors. ``"base"``: add ΔW to the frozen base weights (exact);
            the adapters are untouched.

    Returns:
        Per layer name, the relative error ‖ΔW − ΔW_loaded‖ / ‖ΔW‖ (0.0 for ``"base"``).

    Raises:
        ConfigError: ``into`` is not one of the two choices, or an adapter is merged.
        StateDictMismatchError: names or shapes do not match the LoRA layers.
        NonFiniteError: ΔW holds NaN or inf.
    """
    if into not in ("adapter", "base"):
        raise ConfigError(f"`into` must be 'adapter' or 'base', got {into!r}.")
    pairs = _delta_to_layers(model, delta, "load_lora_delta")
    merged = [n for n, (layer, _) in pairs.items() if layer.merged_adapter is not None]
    if merged:
        raise ConfigError(f"{preview(merged)} hold a merged adapter; call unmerge_lora(model) first.")
    for layer, _ in pairs.values():
        layer._require(adapter)
    errors: dict[str, float] = {}
    for name, (layer, t) in pairs.items():
        if into == "base":
            layer.weight.add_(t.to(device=layer.weight.device, dtype=layer.weight.dtype))
            errors[name] = 0.0
            continue
        key = layer._require(adapter)
        target = t.to(device=layer.weight.device, dtype=torch.float64) / layer.scaling
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        k = min(layer.r, s.numel())
        root = s[:k].sqrt()
        b = torch.zeros(layer.out_features, layer.r, dtype=torch.float64, device=target.device)
        a = torch.zeros(layer.r, layer.in_features, dtype=torch.float64, device=target.device)
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        layer.lora_A[key].copy_(a)
        layer.lora_B[key].copy_(b)
        norm = float(torch.linalg.vector_norm(t.double()))
        got = layer.delta_weight(key).double()
        errors[name] = float(torch.linalg.vector_norm(got - t.to(got.device).double())) / norm if norm > 0 else 0.0
    return errors


def merge_lora(model: nn.Module, *, safe: bool = True) -> None:
    """Fold the active adapter's (alpha/r)·B A into the base weights of every LoRA layer.

    ``forward`` then skips the adapter path, so nothing is counted twice.
    With ``safe=True`` (default) every merged weight is checked for NaN/inf
    before any layer is written.
    """
    layers = _require_layers(model)
    todo = {n: layer for n, layer in layers.items() if layer.merged_adapter is None}
    if not todo:
        warnings.warn("Every LoRA layer is already merged; nothing to do.", stacklevel=2)
        return
    inactive = [n for n, layer in todo.items() if layer.active_adapter is None]
    if inactive:
        raise ConfigError(f"{preview(inactive)} have no active adapter to merge; call set_active_adapter first.")
    if safe:
        with torch.no_grad():
            check_finite({f"{n}.weight": layer.weight + layer.delta_weight() for n, layer in todo.items()}, "merge_lora")
    for layer in todo.values():
        layer.merge(safe=False)


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`: subtract each merged ΔW again (exact up to float rounding)."""
    layers = _require_layers(model)
    todo = [layer for layer in layers.values() if layer.merged_adapter is not None]
    if not todo:
        warnings.warn("No LoRA layer is merged; nothing to unmerge.", stacklevel=2)
        return
    for layer in todo:
        layer.unmerge()


def unload_lora(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Replace every LoRA layer by a plain ``nn.Linear`` holding its (optionally merged) weight.

    Returns ``model``. The weights' ``requires_grad`` is left as it is (False).
    """
    layers = _require_layers(model)
    if "" in layers:
        raise ConfigError("unload_lora needs the LoRA layers inside a parent module, not the layer itself.")
    if merge:
        todo = {n: layer for n, layer in layers.items() if layer.merged_adapter is None and layer.active_adapter is not None}
        with torch.no_grad():
            check_finite({f"{n}.weight": layer.weight + layer.delta_weight() for n, layer in todo.items()}, "unload_lora")
        for layer in todo.values():
            layer.merge(safe=False)
    elif any(layer.merged_adapter is not None for layer in layers.values()):
        warnings.warn("Some LoRA layers are merged; their plain Linear keeps the merged weight.", stacklevel=2)
    for name, layer in layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = layer.weight
        linear.bias = layer.bias
        replace_module(model, name, linear)
    return model


def adapter_bytes(model: nn.Module, adapter: str | None = None) -> int:
    """Bytes that adapter ``adapter`` (default: active) occupies over all LoRA layers: r·(d_in + d_out) each."""
    layers = _require_layers(model)
    total = 0
    for layer in layers.values():
        key = layer._require(adapter)
        total += layer.lora_A[key].numel() * layer.lora_A[key].element_size()
        total += layer.lora_B[key].numel() * layer.lora_B[key].element_size()
    return total


# -- file I/O: moved to cl_plugin.adapters.io ---------------------------------------------
_MOVED_TO_IO = ("lora_state_dict", "save_lora", "load_lora")


def __getattr__(name: str):
    # ``from cl_plugin.adapters.lora import save_lora`` keeps working. Resolved on
    # first use: io imports this module, so a top-level import here would be circular.
    if name in _MOVED_TO_IO:
        from cl_plugin.adapters import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
