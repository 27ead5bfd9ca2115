"""The options of the adapters, checked once.

:class:`LoRAConfig` holds what ``inject_lora`` and ``LoRAAdapters`` need to
wrap layers (PEFT's ``LoraConfig`` in ``peft/tuners/lora/config.py`` plays the
same part), :class:`ShareConfig` what ``SharedSubspace`` needs. Each checks
its values in ``__post_init__`` and nowhere else: the layers, the injection
functions and the callbacks receive a checked object. Both are frozen
dataclasses of plain types, so LightningCLI (jsonargparse) fills them from a
YAML file wherever one is an argument::

    model:
      init_args:
        lora:
          target_modules: [qkv, proj, fc1, fc2]
          r: 8

Plain torch only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

from torch import Tensor

from cl_plugin.adapters.matching import Patterns, _normalise
from cl_plugin.errors import ConfigError, did_you_mean

__all__ = ["LAYER_TYPES", "DEFAULT_LAYER_TYPES", "LoRAConfig", "ShareConfig", "SHARE_INITS", "adapter_key"]

#: The layer types LoRA wraps, by the name ``layer_types=`` takes.
LAYER_TYPES = ("Linear", "Conv1D", "Conv2d", "Embedding")
#: What ``layer_types`` selects unless told otherwise. ``Conv1D`` (transformers' GPT-2 layer) is a
#: Linear with its weight stored transposed. ``Conv2d`` and ``Embedding`` are asked for by name:
#: with them a name list can select more than before (timm's ViT has a Conv2d ``patch_embed.proj``
#: that ``"proj"`` would match).
DEFAULT_LAYER_TYPES = ("Linear", "Conv1D")
#: How a new Share task's coefficients start.
SHARE_INITS = ("previous", "fresh")


# -- single values ----------------------------------------------------------------------------
def adapter_key(name: object, what: str = "adapter") -> str:
    """Normalise an adapter or task name to the string used as a parameter key.

    Integers (and 0-d integer tensors) become their decimal string, so task
    label ``3`` and ``"3"`` name the same adapter.

    Example:
        >>> adapter_key(3), adapter_key("a")
        ('3', 'a')
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


def check_int(value: object, what: str, low: int = 1) -> int:
    """``value`` as an int >= ``low``, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ConfigError(f"`{what}` must be an int >= {low}, got {value!r}.")
    return int(value)


def check_float(value: object, what: str, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    """``value`` as a finite float in the interval, else ConfigError."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"`{what}` must be a real number in {lo}{low:g}, {high:g}{hi}, got {value!r}.")
    return float(value)


def check_patterns(patterns: object, what: str, owner: str, *, required: bool) -> str | tuple[str, ...] | None:
    """A module-name pattern argument, checked and normalised (a regex string or a tuple of names)."""
    if patterns is None and not required:
        return None
    if patterns is None:
        raise ConfigError(
            f"`{what}` is required ({owner}): a regex string or a list of module names, e.g. ['qkv', 'proj', 'fc1', 'fc2']."
        )
    normalised = _normalise(patterns, what)  # type, emptiness of entries, regex syntax
    if required and isinstance(normalised, tuple) and not normalised:
        raise ConfigError(f"`{what}` is empty ({owner}); name at least one module, e.g. ['qkv', 'proj', 'fc1', 'fc2'].")
    return normalised


# -- the option objects ------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRAConfig:
    """Which layers LoRA wraps and how (checked on construction).

    Args:
        target_modules: the layers to wrap: a regex on the full module name,
            or a list of names / dotted suffixes (PEFT's rule,
            :mod:`cl_plugin.adapters.matching`). ``None``: not chosen yet
            (a layer built by hand needs none; ``inject_lora`` requires it).
        exclude_modules: layers never to wrap (same rules, checked first).
        r: adapter rank (default 8).
        alpha: the update is scaled by ``alpha / r`` (default 16).
        dropout: dropout on the adapter input, in [0, 1) (default 0.0).
        trainable: modules of any type trained in full beside the adapters,
            e.g. ``["head"]`` (default none).
        seed: seed of every adapter's initialisation, >= 0 (default 0).
        layer_types: which of :data:`LAYER_TYPES` a name may select (default
            :data:`DEFAULT_LAYER_TYPES`: ``("Linear", "Conv1D")``).

    Raises:
        ConfigError: a value of the wrong type or out of range, an unknown layer type.

    Example:
        >>> LoRAConfig(["qkv"], r=4, alpha=8).scaling
        2.0
        >>> LoRAConfig(["qkv"], layer_types=["Linear", "Conv2D"])
        Traceback (most recent call last):
        ...
        cl_plugin.errors.ConfigError: `layer_types` holds 'Conv2D'; LoRA wraps ['Linear', 'Conv1D', 'Conv2d', 'Embedding']. Did you mean 'Conv2d'?
    """

    target_modules: Patterns | None = None
    exclude_modules: Patterns | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    trainable: Patterns = ()
    seed: int = 0
    layer_types: Sequence[str] = DEFAULT_LAYER_TYPES

    def __post_init__(self) -> None:
        owner = "LoRAConfig"
        values = {
            "target_modules": check_patterns(self.target_modules, "target_modules", owner, required=False),
            "exclude_modules": check_patterns(self.exclude_modules, "exclude_modules", owner, required=False),
            "trainable": check_patterns(self.trainable, "trainable", owner, required=False) or (),
            "r": check_int(self.r, "r"),
            "alpha": check_float(self.alpha, "alpha", 0.0, math.inf, low_open=True, high_open=True),
            "dropout": check_float(self.dropout, "dropout", 0.0, 1.0, low_open=False, high_open=True),
            "seed": check_int(self.seed, "seed", low=0),
            "layer_types": _check_layer_types(self.layer_types),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.r

    def require_targets(self, owner: str) -> str | tuple[str, ...]:
        """``target_modules``, or the ConfigError that says it is required."""
        return check_patterns(self.target_modules, "target_modules", owner, required=True)

    def replace(self, **changes: object) -> LoRAConfig:
        """A copy with ``changes`` applied (checked again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return LoRAConfig(**values)


def _check_layer_types(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        names = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"`layer_types` must be a list of layer type names from {list(LAYER_TYPES)}, got {value!r}.") from None
    for name in names:
        if name not in LAYER_TYPES:
            raise ConfigError(
                f"`layer_types` holds {name!r}; LoRA wraps {list(LAYER_TYPES)}.{did_you_mean(str(name), LAYER_TYPES)}"
            )
    if not names:
        raise ConfigError(f"`layer_types` is empty; name at least one of {list(LAYER_TYPES)}.")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ShareConfig:
    """The options of Share (:class:`~cl_plugin.adapters.SharedSubspace`), checked on construction.

    Args:
        k: basis size per side (default 32, the reference code's), or its
            upper bound when ``explained_variance`` is given.
        p: columns of every coefficient matrix; ``None``: the rank of the
            LoRA the basis starts from.
        explained_variance: keep the smallest K per side whose squared
            singular values reach this fraction of the total, in (0, 1]
            (default: keep ``k``).
        temporary_directions: φ extra trainable directions per side while a
            task trains (default 0).
        init: a new task's coefficients start as the last stored task's
            (``"previous"``, default) or fresh (``"fresh"``: ΔW = 0).
        seed: seeds every random draw, >= 0 (default 0).

    Raises:
        ConfigError: a value of the wrong type or out of range (e.g. ``p > k``).

    Example:
        >>> ShareConfig(k=8, p=9)
        Traceback (most recent call last):
        ...
        cl_plugin.errors.ConfigError: `p`=9 must not exceed `k`=8: a task's coefficients are K×p with K <= k.
    """

    k: int = 32
    p: int | None = None
    explained_variance: float | None = None
    temporary_directions: int = 0
    init: str = "previous"
    seed: int = 0

    def __post_init__(self) -> None:
        k = check_int(self.k, "k")
        p = None if self.p is None else check_int(self.p, "p")
        if p is not None and p > k:
            raise ConfigError(f"`p`={p} must not exceed `k`={k}: a task's coefficients are K×p with K <= k.")
        explained = self.explained_variance
        if explained is not None:
            explained = check_float(explained, "explained_variance", 0.0, 1.0, low_open=True, high_open=False)
        if self.init not in SHARE_INITS:
            raise ConfigError(
                f"`init` must be one of {list(SHARE_INITS)}, got {self.init!r}.{did_you_mean(str(self.init), SHARE_INITS)}"
            )
        values = {
            "k": k,
            "p": p,
            "explained_variance": explained,
            "temporary_directions": check_int(self.temporary_directions, "temporary_directions", low=0),
            "seed": check_int(self.seed, "seed", low=0),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
