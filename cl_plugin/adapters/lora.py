"""LoRA on a whole model: injection by module name, ΔW as task vectors, per-task adapters, merge.

The layers are in :mod:`cl_plugin.adapters.lora_layer` (``nn.Linear``,
transformers' ``Conv1D``, ``nn.Conv2d``, ``nn.Embedding``), their options in
:class:`~cl_plugin.adapters.LoRAConfig`, file I/O in :mod:`cl_plugin.adapters.io`.
These functions act on every LoRA layer of a model at once, as PEFT's
``LoraModel`` (``peft/tuners/lora/model.py``) does. ``docs/adapters.md`` is
the user guide.

Plain torch only.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from cl_plugin._checks import check_finite
from cl_plugin.adapters.config import DEFAULT_LAYER_TYPES, LoRAConfig, adapter_key
from cl_plugin.adapters.layer import (
    InjectionSummary,
    adapter_layers,
    check_parent_calls_forward,
    count_parameters,
    forward_by_task,
    freeze_except,
    replace_module,
    require_layers,
    use_adapter,
)
from cl_plugin.adapters.lora_layer import (
    LoRAConv1D,
    LoRAConv2d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    lora_class_for,
    lora_target_types,
    merge_layers,
)
from cl_plugin.adapters.matching import Patterns, match_modules
from cl_plugin.errors import ConfigError, StateDictMismatchError, preview
from cl_plugin.task_vectors import TaskVector

__all__ = [
    "VIT_TARGET_MODULES",
    "InjectionSummary",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRAEmbedding",
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

_INJECT_DEFAULTS = dict(
    exclude_modules=None, r=8, alpha=16.0, dropout=0.0, trainable=(), seed=0, layer_types=DEFAULT_LAYER_TYPES
)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of ``model`` (any layer type), by module name, in module order."""
    return adapter_layers(model, LoRALayer)


def _require_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return require_layers(model, LoRALayer, "has no LoRA layers. Call inject_lora(model, target_modules=...) first.")


def weight_key(name: str) -> str:
    """The state-dict name of layer ``name``'s weight (what :func:`lora_delta` keys)."""
    return f"{name}.weight" if name else "weight"


def inject_lora(
    model: nn.Module,
    target_modules: Patterns | None = None,
    *,
    exclude_modules: Patterns | None = None,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    trainable: Patterns = (),
    adapter_name: str = "default",
    seed: int = 0,
    layer_types=DEFAULT_LAYER_TYPES,
    config: LoRAConfig | None = None,
) -> InjectionSummary:
    """Wrap the matching layers of ``model`` in place with LoRA layers.

    Afterwards only the new adapters and the modules named in ``trainable``
    require gradients; every other parameter is frozen.

    Args:
        model: a timm model, a transformers model, or any torch module.
        target_modules: which layers to wrap: a regex on the full module
            name, or a list of names / dotted suffixes (see
            :mod:`cl_plugin.adapters.matching`). For timm ViTs:
            :data:`VIT_TARGET_MODULES`; GPT-2: ``["c_attn", "c_proj", "c_fc"]``.
        exclude_modules: layers never to wrap (same rules, checked first).
        r: adapter rank (default 8).
        alpha: the update is scaled by ``alpha / r`` (default 16).
        dropout: dropout on the adapter input (default 0.0).
        trainable: modules (of any type) to train in full, e.g. ``["head"]``.
            The base weights of wrapped layers inside them stay frozen.
        adapter_name: name of the adapter created on every layer (default ``"default"``).
        seed: seed of the adapters' initialisation (default 0); every layer
            derives its own generator from it and its name.
        layer_types: the layer types a name may select, from ``("Linear",
            "Conv1D", "Conv2d", "Embedding")`` (default ``("Linear", "Conv1D")``;
            name ``"Conv2d"`` for a ResNet's convolutions).
        config: all of the above but ``adapter_name`` as one
            :class:`~cl_plugin.adapters.LoRAConfig`; then leave the others at their defaults.

    Returns:
        An :class:`InjectionSummary`.

    Raises:
        ConfigError: an argument is out of range; a layer is both wrapped and in
            ``trainable``; a target is ``nn.MultiheadAttention.out_proj``, or a
            convolution or embedding LoRA cannot describe (see
            :mod:`cl_plugin.adapters.lora_layer`); ``config`` given with other options.
        NoMatchingModulesError: a pattern set selects nothing (the message lists
            the patterns and up to 10 names of wrappable layers that exist).

    Nothing is changed in ``model`` when an error is raised.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> inject_lora(net, ["0"], r=1, trainable=["2"]).wrapped
        ('0',)
        >>> [n for n, p in net.named_parameters() if p.requires_grad]
        ['0.lora_A.default', '0.lora_B.default', '2.weight', '2.bias']
    """
    options = dict(
        exclude_modules=exclude_modules, r=r, alpha=alpha, dropout=dropout, trainable=trainable, seed=seed, layer_types=layer_types
    )
    if config is None:
        config = LoRAConfig(target_modules=target_modules, **options)
    else:
        given = [k for k, v in options.items() if v != _INJECT_DEFAULTS[k]] + (["target_modules"] if target_modules is not None else [])
        if not isinstance(config, LoRAConfig):
            raise ConfigError(f"`config` must be a LoRAConfig, got {type(config).__name__}.")
        if given:
            raise ConfigError(f"inject_lora got `config` and {given}; put every option in the LoRAConfig.")
    return inject(model, config, adapter_name=adapter_name)


def inject(model: nn.Module, config: LoRAConfig, *, adapter_name: str = "default", owner: str = "inject_lora") -> InjectionSummary:
    """:func:`inject_lora` with a checked :class:`LoRAConfig` (what the callbacks call)."""
    targets = config.require_targets(owner)
    adapter_name = adapter_key(adapter_name, "adapter_name")
    result = match_modules(
        model, targets, config.exclude_modules, module_types=lora_target_types(config.layer_types), what="target_modules"
    )
    trainable_names: tuple[str, ...] = ()
    if isinstance(config.trainable, str) or config.trainable:
        trainable_names = match_modules(model, config.trainable, None, module_types=None, what="trainable").matched
    both = sorted(set(trainable_names) & set(result.matched))
    if both:
        raise ConfigError(
            f"{preview(both)} is both in `target_modules` and in `trainable`: a wrapped layer keeps its weight "
            "frozen. Remove it from one of them (e.g. exclude_modules=['head'] to train the head in full)."
        )
    check_parent_calls_forward(model, result.matched, "target_modules")
    classes = {name: lora_class_for(model.get_submodule(name)) for name in result.matched}
    for name, cls in classes.items():  # per-type refusals (grouped convolutions, ...), before any change
        cls.check_base(model.get_submodule(name), name)
    # -- all checks passed; now change the model --
    for name, cls in classes.items():
        layer = cls(model.get_submodule(name), config, adapter_name=adapter_name, seed=config.seed, name=name)
        replace_module(model, name, layer)
    layers = lora_layers(model)
    frozen = {id(p) for layer in layers.values() for p in (layer.weight, layer.bias) if p is not None}
    freeze_except(model, trainable_names, frozen)
    for name in result.matched:
        layers[name].set_trainable(adapter_name)
    trainable_count, total = count_parameters(model)
    return InjectionSummary(result.matched, trainable_names, trainable_count, total)


# -- adapters by name ------------------------------------------------------------------------------
def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The adapter names present on every LoRA layer of ``model``."""
    layers = _require_layers(model)
    common = set.intersection(*(set(layer.adapters) for layer in layers.values()))
    first = next(iter(layers.values()))
    return tuple(n for n in first.adapters if n in common)


def add_adapter(model: nn.Module, name: str | int, *, seed: int = 0) -> None:
    """Create a fresh, frozen adapter ``name`` on every LoRA layer (for per-task adapters).

    Make it the trained one with :func:`set_active_adapter`.
    """
    layers = _require_layers(model)
    key = adapter_key(name)
    clash = [n for n, layer in layers.items() if layer.has_adapter(key)]
    if clash:
        raise ConfigError(f"Adapter {key!r} already exists on {preview(clash)}; pick another name.")
    for layer in layers.values():
        layer.add_adapter(key, seed=seed)


def delete_adapter(model: nn.Module, name: str | int) -> None:
    """Remove adapter ``name`` from every LoRA layer."""
    layers = _require_layers(model)
    key = adapter_key(name)
    missing = [n for n, layer in layers.items() if not layer.has_adapter(key)]
    if missing:
        raise ConfigError(f"Adapter {key!r} does not exist on {preview(missing)}; adapters: {list(adapter_names(model))}.")
    for layer in layers.values():
        layer.delete_adapter(key)


def set_active_adapter(model: nn.Module, name: str | int | None, *, trainable: bool = True) -> None:
    """Use adapter ``name`` on every LoRA layer (``None``: base model only).

    With ``trainable=True`` (default) ``name`` also becomes the only trainable
    adapter and every other adapter is frozen, which is what DDP needs; use
    ``trainable=False`` (or :func:`use_adapter`) to evaluate with another
    adapter without touching ``requires_grad``.
    """
    layers = _require_layers(model)
    key = None if name is None else adapter_key(name)
    if key is not None:
        missing = [n for n, layer in layers.items() if not layer.has_adapter(key)]
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


def reset_lora(model: nn.Module, adapter: str | int | None = None, *, seed: int = 0) -> None:
    """Re-draw ``adapter`` (default: the active one) on every layer: PEFT's initialisation, seeded per layer."""
    layers = _require_layers(model)
    for layer in layers.values():
        layer._require(adapter)
        if layer.merged_adapter is not None:
            raise ConfigError("An adapter is merged into the weights; call unmerge_lora(model) before resetting.")
    for layer in layers.values():
        layer.reset_adapter(adapter, seed=seed)


# -- ΔW ----------------------------------------------------------------------------------------------
def lora_delta(model: nn.Module, adapter: str | int | None = None) -> TaskVector:
    """ΔW of every LoRA layer, as a task vector over the wrapped weights.

    Keys are the weights' names in the model without adapters
    (``blocks.0.attn.qkv.weight``), values are shaped like those weights, so
    ``lora_delta(m).apply_to(original)`` gives the adapted model and the result
    feeds any merger. The tensors are new (detached) and in the base weights' dtype.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> _ = inject_lora(net, ["0"], r=1)
        >>> list(lora_delta(net))
        ['0.weight']
    """
    layers = _require_layers(model)
    return TaskVector({weight_key(name): layer.delta_weight(adapter) for name, layer in layers.items()})


def _delta_to_layers(model: nn.Module, delta: Mapping[str, Tensor], what: str) -> dict[str, tuple[LoRALayer, Tensor]]:
    layers = _require_layers(model)
    by_key = {weight_key(n): (n, layer) for n, layer in layers.items()}
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
    check_finite(dict(delta), what)
    return out


@torch.no_grad()
def load_lora_delta(
    model: nn.Module, delta: Mapping[str, Tensor], adapter: str | int | None = None, *, into: str = "adapter"
) -> dict[str, float]:
    """Write a ΔW per LoRA layer (e.g. a merged task vector) back into the model.

    Args:
        model: a model with LoRA layers.
        delta: name -> ΔW over the wrapped weights (the keys of :func:`lora_delta`).
        adapter: which adapter receives it with ``into="adapter"`` (default: the active one).
        into: ``"adapter"``: set B, A to the best rank-r fit of ΔW (truncated
            SVD of ΔW as the matrix B A, split as B = U√S, A = √S Vᵀ, divided
            by alpha/r); exact when rank(ΔW) ≤ r. Directions beyond rank(ΔW)
            start at zero in both factors. ``"base"``: add ΔW to the frozen
            base weights (exact); the adapters are untouched.

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
        target = layer.weight_to_matrix(t.to(device=layer.weight.device, dtype=torch.float64)) / layer.scaling
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        k = min(layer.r, s.numel())
        root = s[:k].sqrt()
        b = torch.zeros(target.shape[0], layer.r, dtype=torch.float64, device=target.device)
        a = torch.zeros(layer.r, target.shape[1], dtype=torch.float64, device=target.device)
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        layer.lora_A[key].copy_(a.reshape(layer.lora_A[key].shape))
        layer.lora_B[key].copy_(b.reshape(layer.lora_B[key].shape))
        norm = float(torch.linalg.vector_norm(t.double()))
        got = layer.delta_weight(key).double()
        errors[name] = float(torch.linalg.vector_norm(got - t.to(got.device).double())) / norm if norm > 0 else 0.0
    return errors


def merge_lora(model: nn.Module, *, safe: bool = True) -> None:
    """Fold the active adapter's ΔW into the base weights of every LoRA layer.

    ``forward`` then skips the adapter path, so nothing is counted twice.
    Every ΔW is computed once; with ``safe=True`` (default) every merged
    weight is checked for NaN/inf before any layer is written.
    """
    layers = _require_layers(model)
    todo = {n: layer for n, layer in layers.items() if layer.merged_adapter is None}
    if not todo:
        warnings.warn("Every LoRA layer is already merged; nothing to do.", stacklevel=2)
        return
    merge_layers(todo, safe=safe, what="merge_lora")


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
    """Replace every LoRA layer by a plain layer of its original type holding its (optionally merged) weight.

    Returns ``model``. The weights' ``requires_grad`` is left as it is (False).
    """
    layers = _require_layers(model)
    if "" in layers:
        raise ConfigError("unload_lora needs the LoRA layers inside a parent module, not the layer itself.")
    if merge:
        todo = {n: layer for n, layer in layers.items() if layer.merged_adapter is None and layer.active_adapter is not None}
        if todo:
            merge_layers(todo, safe=True, what="unload_lora")
    elif any(layer.merged_adapter is not None for layer in layers.values()):
        warnings.warn("Some LoRA layers are merged; their plain layer keeps the merged weight.", stacklevel=2)
    for name, layer in layers.items():
        replace_module(model, name, layer.to_base())
    return model


def adapter_bytes(model: nn.Module, adapter: str | int | None = None) -> int:
    """Bytes that adapter ``adapter`` (default: active) occupies over all LoRA layers."""
    layers = _require_layers(model)
    return sum(t.numel() * t.element_size() for layer in layers.values() for t in layer.adapter_tensors(adapter).values())


# -- file I/O lives in cl_plugin.adapters.io ---------------------------------------------------------
_MOVED_TO_IO = ("lora_state_dict", "save_lora", "load_lora")


def __getattr__(name: str):
    # ``from cl_plugin.adapters.lora import save_lora`` keeps working. Resolved on
    # first use: io imports this module, so a top-level import here would be circular.
    if name in _MOVED_TO_IO:
        from cl_plugin.adapters import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
