"""LoRA adapters on disk, in HuggingFace PEFT's format.

:func:`save_lora` writes a directory that ``peft.PeftModel.from_pretrained(base, directory)``
loads exactly, and :func:`load_lora` reads such directories, whether PEFT or
cl-plugin wrote them. The format follows PEFT 0.21 (``peft/utils/save_and_load.py``
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``,
``peft/peft_model.py`` ``PeftModel.save_pretrained`` / ``from_pretrained``,
``peft/tuners/lora/config.py`` ``LoraConfig``):

- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight``
  and ``...lora_B.weight`` (for an ``nn.Embedding``: ``...lora_embedding_A``
  and ``...lora_embedding_B``), shaped as in
  :mod:`cl_plugin.adapters.lora_layer`, without the adapter name;
  for every module of ``modules_to_save``, each key of its ``state_dict()`` as
  ``base_model.model.<module>.<key>`` (PEFT's ``modules_to_save.<adapter>.``
  infix removed). ``<module>`` is the name inside the model that PEFT wraps.
- ``adapter_config.json``: the ``LoraConfig`` fields ``peft_type``, ``r``,
  ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``bias``,
  ``fan_in_fan_out``, ``modules_to_save``, ``rank_pattern``, ``alpha_pattern``,
  ``use_rslora``, ``task_type``, ``base_model_name_or_path``, ...

Facts of PEFT's that the export respects:

- Loading looks up *every* tensor of every module that ``modules_to_save``
  selects and raises ``KeyError`` when one is missing. ``task_type`` adds
  modules by itself (``"SEQ_CLS"`` and ``"TOKEN_CLS"``: ``classifier`` and
  ``score``; ``"QUESTION_ANS"``: ``qa_outputs``), so those are saved too.
- A ``target_modules`` list entry selects a module named so or ending with
  ``"." + entry``; a ``modules_to_save`` entry selects every module whose name
  ends with it (plain ``str.endswith``); ``rank_pattern`` / ``alpha_pattern``
  keys are regexes (``re.match(rf"(.*\\.)?({key})$", name)``). The export
  writes full module names (escaped in the patterns) and refuses a name that
  would also select another module.

Where PEFT's base model is: a LightningModule holds the network as an
attribute (``self.model``), so the LoRA layers are named ``model.bert...``
there but ``bert...`` in the network PEFT wraps. ``save_lora(...,
base_model=pl_module.model)`` says which submodule that is; for a
LightningModule whose LoRA layers (and modules to save) all lie under one
child it is found by itself.

The older single-file form (a path ending in ``.safetensors``: the tensors in
PEFT's key format, ``r``/``lora_alpha`` in the file's metadata, names relative
to the model passed) is still written and read.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from cl_plugin._checks import check_finite
from cl_plugin.adapters.config import adapter_key
from cl_plugin.adapters.lora import _require_layers
from cl_plugin.adapters.lora_layer import LoRAEmbedding, LoRALayer
from cl_plugin.adapters.matching import Patterns, match_modules
from cl_plugin.errors import CheckpointError, ConfigError, StateDictMismatchError, did_you_mean, preview

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "lora_state_dict", "save_lora", "load_lora"]

#: The files of a PEFT adapter directory.
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"

_FORMAT = "cl_plugin.lora"
_FORMAT_VERSION = "1"
_PEFT_PREFIX = "base_model.model."
# ``<module>.lora_A[.<adapter>].weight`` (Linear, Conv1D, Conv2d) or ``<module>.lora_embedding_A[.<adapter>]`` (Embedding).
_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|lora_embedding_(?P<eside>[AB])(?:\.(?P<eadapter>[^.]+))?)$"
)

#: PEFT's ``TaskType`` values.
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: Modules that PEFT adds to ``modules_to_save`` for a task type (``peft/peft_model.py``).
_TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


# -- names ------------------------------------------------------------------------------
def _under(name: str, root: str) -> bool:
    """``name`` lies strictly inside module ``root`` (``""``: the model itself)."""
    return not root or name.startswith(root + ".")


def _relative(name: str, root: str) -> str:
    return name[len(root) + 1 :] if root else name


def _top_most(names: Sequence[str]) -> list[str]:
    """Drop every name that lies inside another one of ``names`` (order kept)."""
    return [n for n in names if not any(o != n and o and _under(n, o) for o in names)]


def _is_lightning_module(model: nn.Module) -> bool:
    # Recognised by class name and package, so cl_plugin.adapters never imports Lightning.
    return any(
        cls.__name__ == "LightningModule" and cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
        for cls in type(model).__mro__
    )


def _submodule_name(model: nn.Module, sub: object, what: str) -> str:
    if not isinstance(sub, nn.Module):
        raise ConfigError(f"`{what}` must be an nn.Module inside the model, got {type(sub).__name__}.")
    for name, module in model.named_modules(remove_duplicate=False):
        if module is sub:
            return name
    raise ConfigError(
        f"`{what}` ({type(sub).__name__}) is not a submodule of the {type(model).__name__} you pass; "
        f"pass the module itself, e.g. {what}=pl_module.model."
    )


def _containing_lora(layers: Mapping[str, LoRALayer]) -> set[str]:
    """Names of the LoRA layers and of every module that contains one."""
    out = set()
    for name in layers:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    return out


def _trainable_modules(model: nn.Module, layers: Mapping[str, LoRALayer]) -> list[str]:
    """The modules whose parameters ``inject_lora(trainable=...)`` left trainable, top-most first.

    A module qualifies when it holds no LoRA layer and every parameter in it
    requires gradients; a trainable parameter that no such module covers
    brings in the module that owns it directly.
    """
    lora_ids = {id(p) for layer in layers.values() for p in layer.parameters()}
    with_lora = _containing_lora(layers)
    selected: list[str] = []
    for name, module in model.named_modules():
        if name in with_lora or any(_under(name, s) for s in (*selected, *layers)):
            continue
        params = [p for p in module.parameters() if id(p) not in lora_ids]
        if params and all(p.requires_grad for p in params):
            selected.append(name)
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) in lora_ids:
            continue
        owner = pname.rpartition(".")[0]
        if owner in selected or any(_under(owner, s) for s in selected):
            continue
        if owner in with_lora:
            raise ConfigError(
                f"save_lora: parameter {pname!r} requires gradients but belongs to "
                f"{owner or type(model).__name__!r}, which also holds LoRA layers; PEFT's modules_to_save cannot "
                "hold it. Pass `modules_to_save=` explicitly, or freeze it."
            )
        selected.append(owner)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(selected, key=lambda n: order.get(n, len(order)))


def _modules_to_save(model: nn.Module, layers: Mapping[str, LoRALayer], patterns: Patterns | None) -> list[str]:
    if patterns is None:
        names = _trainable_modules(model, layers)
    elif not isinstance(patterns, str) and not patterns:
        names = []
    else:
        names = _top_most(match_modules(model, patterns, None, module_types=None, what="modules_to_save").matched)
    return names


def _check_saved_modules(names: Sequence[str], layers: Mapping[str, LoRALayer]) -> None:
    with_lora = _containing_lora(layers)
    bad = [n for n in names if n in with_lora or any(_under(n, layer) for layer in layers)]
    if bad:
        raise ConfigError(
            f"save_lora: modules_to_save {preview(bad)} contain or lie inside LoRA layers; PEFT keeps a module "
            "to save and a LoRA layer apart. Name modules without LoRA layers (e.g. the head)."
        )


def _base_root(model: nn.Module, base_model: nn.Module | None, names: Sequence[str]) -> str:
    """The name of the module PEFT wraps (``""``: ``model`` itself), checked to contain ``names``."""
    if base_model is not None:
        root = _submodule_name(model, base_model, "base_model")
    elif _is_lightning_module(model):
        heads = sorted({n.split(".")[0] for n in names})
        child = dict(model.named_children()).get(heads[0]) if len(heads) == 1 else None
        if child is None or isinstance(child, LoRALayer):
            raise ConfigError(
                f"save_lora: cannot tell which module of {type(model).__name__} PEFT should wrap: the LoRA layers "
                f"and modules to save lie under the children {preview(heads)}, not under exactly one child that "
                "is not itself a LoRA layer. Pass `base_model=` the submodule PEFT will wrap (e.g. "
                "save_lora(pl_module, path, base_model=pl_module.model)), or base_model=pl_module to export the "
                "LightningModule itself."
            )
        root = heads[0]
    else:
        root = ""
    outside = [n for n in names if not _under(n, root)]
    if outside:
        raise ConfigError(
            f"save_lora: {preview(outside)} lie outside `base_model` ({root!r}); a file can only hold what lies "
            "inside the model PEFT wraps. Pass a `base_model` that contains every LoRA layer and module to save."
        )
    return root


def _check_peft_selection(
    model: nn.Module, root: str, layers: Mapping[str, LoRALayer], targets: Sequence[str], saved: Sequence[str]
) -> None:
    """Refuse names that PEFT's matching would also apply to other modules of the base model."""
    names = [
        _relative(n, root)
        for n, _ in model.named_modules()
        if _under(n, root) and not any(_under(n, layer) for layer in layers)
    ]
    clashes = []
    for t in targets:
        clashes += [f"target {t!r} also selects {n!r}" for n in names if n.endswith("." + t)]
    for s in saved:
        clashes += [f"modules_to_save {s!r} also selects {n!r}" for n in names if n != s and n.endswith(s)]
    if clashes:
        raise ConfigError(
            f"save_lora: PEFT's name matching would select more modules than the ones adapted here: "
            f"{'; '.join(clashes[:5])}. Pass a `base_model` in which these names are unique."
        )


# -- tensors and config -----------------------------------------------------------------
def _peft_key(layer: LoRALayer, side: str) -> str:
    """The key of factor ``side`` ("A" or "B") in PEFT's saved format (PEFT keeps an Embedding's factors as bare Parameters)."""
    return f"lora_embedding_{side}" if isinstance(layer, LoRAEmbedding) else f"lora_{side}.weight"


def _factor_tensors(layers: Mapping[str, LoRALayer], adapter: str | None, root: str) -> dict[str, Tensor]:
    out = {}
    for name, layer in layers.items():
        key = layer._require(adapter)
        rel = _relative(name, root)
        for side in "AB":
            out[f"{_PEFT_PREFIX}{rel}.{_peft_key(layer, side)}"] = getattr(layer, f"lora_{side}")[key].detach().to("cpu").clone().contiguous()
    return out


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _peft_config(
    layers: Mapping[str, LoRALayer],
    saved: Sequence[str],
    task_type: str | None,
    base_model_name_or_path: str | None,
) -> dict:
    """PEFT's ``LoraConfig`` as a JSON mapping, for layers keyed by their name in the base model."""
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    dropouts = sorted({layer.dropout for layer in layers.values()})
    if len(dropouts) > 1:
        warnings.warn(
            f"save_lora: the LoRA layers use different dropout {dropouts}; PEFT's config holds one, "
            f"{dropouts[-1]} is written (dropout only acts in training).",
            UserWarning,
            stacklevel=3,
        )
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": float(dropouts[-1]),
        "target_modules": list(layers),
        "rank_pattern": {re.escape(n): layer.r for n, layer in layers.items() if layer.r != r},
        "alpha_pattern": {re.escape(n): _json_number(layer.alpha) for n, layer in layers.items() if layer.alpha != alpha},
        "modules_to_save": list(saved) or None,
        "bias": "none",
        "fan_in_fan_out": any(layer.type_name == "Conv1D" for layer in layers.values()),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def lora_state_dict(
    model: nn.Module, adapter: str | None = None, *, base_model: nn.Module | None = None
) -> dict[str, Tensor]:
    """Adapter ``adapter`` (default: active) in PEFT's saved-key format, on CPU.

    Keys: ``base_model.model.<module>.lora_A.weight`` and ``...lora_B.weight``
    (an Embedding's: ``...lora_embedding_A`` / ``..._B``), ``<module>`` relative to ``base_model``
    (default: ``model``); scaling is *not* folded in.

    Example:
        >>> from cl_plugin.adapters import inject_lora
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> _ = inject_lora(net, ["0"], r=1)
        >>> {k: tuple(v.shape) for k, v in lora_state_dict(net).items()}
        {'base_model.model.0.lora_A.weight': (1, 3), 'base_model.model.0.lora_B.weight': (2, 1)}
    """
    layers = _require_layers(model)
    root = "" if base_model is None else _submodule_name(model, base_model, "base_model")
    outside = [n for n in layers if not _under(n, root)]
    if outside:
        raise ConfigError(f"lora_state_dict: the LoRA layers {preview(outside)} lie outside `base_model` ({root!r}).")
    return _factor_tensors(layers, adapter, root)


# -- saving ---------------------------------------------------------------------------------
def save_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter: str | None = None,
    *,
    base_model: nn.Module | None = None,
    modules_to_save: Patterns | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter ``adapter`` (default: the active one) so that PEFT loads it exactly.

    Args:
        model: a model with LoRA layers (``inject_lora`` first): the network,
            or the LightningModule that holds it.
        path: a directory (created if needed): PEFT's layout,
            ``adapter_model.safetensors`` + ``adapter_config.json``, for
            ``PeftModel.from_pretrained(base, path)``. A path ending in
            ``.safetensors``: one file, the older form (LoRA factors only, ``r``
            and ``lora_alpha`` in its metadata, names relative to ``model``
            unless ``base_model`` is given).
        adapter: which adapter to write (default: each layer's active one).
        base_model: the submodule of ``model`` that PEFT will wrap (e.g.
            ``pl_module.model``); every name in the files is relative to it.
            Default: ``model`` itself, or for a LightningModule its one child
            that holds every LoRA layer and module to save.
        modules_to_save: modules saved in full next to the adapter (PEFT's
            ``modules_to_save``), with the rules of ``inject_lora``'s
            ``trainable=`` on the names of ``model``; ``[]``: none. Default:
            the modules whose parameters require gradients outside the LoRA
            layers, i.e. what ``inject_lora(trainable=...)`` left trainable.
            Directory form only.
        task_type: PEFT's task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...), so
            that ``PeftModel.from_pretrained`` builds the matching class. PEFT
            then treats ``classifier``/``score`` (``SEQ_CLS``, ``TOKEN_CLS``) or
            ``qa_outputs`` (``QUESTION_ANS``) as modules to save and requires
            them in the file, so those present in the base model are saved too.
            Directory form only.
        base_model_name_or_path: the base model's hub id or folder, recorded in
            the config (PEFT's field). Directory form only.

    Every layer's ``r`` and ``alpha`` are kept: the most common ones are the
    config's ``r`` and ``lora_alpha``, the others go to ``rank_pattern`` /
    ``alpha_pattern``. The modules to save are written as they are now (there
    is one copy, whatever ``adapter`` is). Each file is written atomically; an
    existing one is replaced with a log line (:func:`cl_plugin._io.atomic_output`).

    Raises:
        ConfigError: ``adapter`` does not exist; the base model cannot be told
            (the message says what to pass) or does not contain every LoRA layer
            and module to save; a module to save contains a LoRA layer; PEFT's
            name matching would select other modules too; ``task_type`` is
            unknown; a directory-only option is given with a ``.safetensors`` path.
        NoMatchingModulesError: ``model`` has no LoRA layers, or
            ``modules_to_save`` matches nothing.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import load_file
        >>> from cl_plugin.adapters import inject_lora
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = inject_lora(net, ["0"], r=2, trainable=["2"])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_lora(net, folder)
        ...     config = json.loads(Path(folder, "adapter_config.json").read_text())
        ...     keys = sorted(load_file(Path(folder, "adapter_model.safetensors")))
        >>> config["target_modules"], config["modules_to_save"], config["r"], config["lora_alpha"]
        (['0'], ['2'], 2, 16)
        >>> for key in keys:
        ...     print(key)
        base_model.model.0.lora_A.weight
        base_model.model.0.lora_B.weight
        base_model.model.2.bias
        base_model.model.2.weight
    """
    from safetensors.torch import save_file

    from cl_plugin._io import atomic_output

    if task_type is not None and task_type not in _TASK_TYPES:
        hint = did_you_mean(str(task_type), _TASK_TYPES)
        raise ConfigError(f"`task_type` must be one of {list(_TASK_TYPES)} or None, got {task_type!r}.{hint}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ConfigError(f"`base_model_name_or_path` must be a string or None, got {base_model_name_or_path!r}.")
    layers = _require_layers(model)
    for layer in layers.values():
        layer._require(adapter)
    if os.fspath(path).endswith(".safetensors"):
        directory_only = {
            "modules_to_save": modules_to_save,
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
        }
        given = [f"`{k}`" for k, v in directory_only.items() if v is not None]
        if given:
            raise ConfigError(
                f"save_lora: {', '.join(given)} belong to PEFT's directory form; {os.fspath(path)!r} ends in "
                ".safetensors (the single-file form). Pass a directory path instead."
            )
        root = "" if base_model is None else _submodule_name(model, base_model, "base_model")
        _save_lora_file(layers, path, adapter, root)
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(
            f"save_lora: {os.fspath(path)!r} is a file; pass a directory (PEFT's layout) or a path ending in "
            ".safetensors (one file)."
        )
    saved = _modules_to_save(model, layers, modules_to_save)
    root = _base_root(model, base_model, [*layers, *saved])
    for entry in _TASK_MODULES.get(task_type, ()):
        extra = [
            n
            for n, _ in model.named_modules()
            if _under(n, root) and _relative(n, root).endswith(entry) and not any(_under(n, x) for x in layers)
        ]
        saved = _top_most([*saved, *(n for n in extra if n not in saved)])
    _check_saved_modules(saved, layers)
    by_rel = {_relative(n, root): layer for n, layer in layers.items()}
    saved_rel = [_relative(n, root) for n in saved]
    _check_peft_selection(model, root, layers, list(by_rel), saved_rel)
    tensors = _factor_tensors(layers, adapter, root)
    for name, rel in zip(saved, saved_rel):
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{_PEFT_PREFIX}{rel}.{key}"] = value.detach().to("cpu").clone().contiguous()
    config = _peft_config(by_rel, saved_rel, task_type, base_model_name_or_path)
    with atomic_output(target / ADAPTER_WEIGHTS_NAME) as tmp:
        save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})
    with atomic_output(target / ADAPTER_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_lora_file(layers: Mapping[str, LoRALayer], path: str | os.PathLike, adapter: str | None, root: str) -> None:
    from safetensors.torch import save_file

    from cl_plugin._io import atomic_output

    outside = [n for n in layers if not _under(n, root)]
    if outside:
        raise ConfigError(f"save_lora: the LoRA layers {preview(outside)} lie outside `base_model` ({root!r}).")
    tensors = _factor_tensors(layers, adapter, root)
    first = next(iter(layers.values()))
    rs = {layer.r for layer in layers.values()}
    alphas = {layer.alpha for layer in layers.values()}
    metadata = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "adapter": first._require(adapter),
        "target_modules": json.dumps([_relative(n, root) for n in layers]),
    }
    if len(rs) == 1 and len(alphas) == 1:
        metadata["r"] = str(first.r)
        metadata["lora_alpha"] = repr(first.alpha)
    else:
        metadata["rank_pattern"] = json.dumps({_relative(n, root): layer.r for n, layer in layers.items()})
        metadata["alpha_pattern"] = json.dumps({_relative(n, root): layer.alpha for n, layer in layers.items()})
    with atomic_output(path) as tmp:
        save_file(tensors, os.fspath(tmp), metadata=metadata)


# -- loading -------------------------------------------------------------------------------
def _read_source(source, config):
    """Return (tensors, config dict or None) from a mapping, a file or a PEFT directory."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if isinstance(config, (str, os.PathLike)):
        with open(config, encoding="utf-8") as fh:
            config = json.load(fh)
    if isinstance(source, Mapping):
        return dict(source), config
    path = os.fspath(source)
    if os.path.isdir(path):
        file = os.path.join(path, ADAPTER_WEIGHTS_NAME)
        if not os.path.exists(file):
            if os.path.exists(os.path.join(path, "adapter_model.bin")):
                raise ConfigError(
                    f"{path!r} holds adapter_model.bin, a pickle; cl-plugin loads only safetensors. Convert it with "
                    "safetensors.torch.save_file(torch.load(path, weights_only=True), ...) on a file you trust."
                )
            raise FileNotFoundError(f"No {ADAPTER_WEIGHTS_NAME} in {path!r}.")
        cfg_file = os.path.join(path, ADAPTER_CONFIG_NAME)
        if config is None and os.path.exists(cfg_file):
            with open(cfg_file, encoding="utf-8") as fh:
                config = json.load(fh)
        path = file
    if not os.path.exists(path):
        raise FileNotFoundError(f"No adapter file at {path!r}.")
    if not path.endswith(".safetensors"):
        raise ConfigError(f"{path!r} is not a .safetensors file; cl-plugin loads adapters only from safetensors.")
    with safe_open(path, framework="pt") as fh:
        metadata = fh.metadata() or {}
    if metadata.get("format") == _FORMAT:
        version = metadata.get("format_version", _FORMAT_VERSION)
        if not version.isdigit() or int(version) > int(_FORMAT_VERSION):
            raise CheckpointError(
                f"{path!r} was written by cl-plugin with format_version={version!r}; this version reads up to "
                f"{_FORMAT_VERSION}. Upgrade cl-plugin to load it."
            )
    if config is None and metadata.get("format") == _FORMAT:
        config = {}
        if "r" in metadata:
            config["r"] = int(metadata["r"])
            config["lora_alpha"] = float(metadata["lora_alpha"])
        for k in ("rank_pattern", "alpha_pattern"):
            if k in metadata:
                config[k] = json.loads(metadata[k])
    return load_file(path), config


def _pattern_value(patterns: Mapping[str, float] | None, name: str, default: float) -> float:
    # PEFT's rule (peft/utils/other.py::get_pattern_key): the first key k with
    # re.match(rf"(.*\.)?({k})$", name) wins.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _file_scaling(config: Mapping | None, module: str, r_file: int) -> float | None:
    if config is None:
        return None
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", r_file))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    if int(r) != r_file:
        raise StateDictMismatchError(
            f"load_lora: the config gives r={r} for {module!r}, but its lora_A has {r_file} rows."
        )
    return float(alpha) / (math.sqrt(r_file) if config.get("use_rslora", False) else r_file)


def _resolve(name: str, candidates: Sequence[str]) -> tuple[str | None, list[str]]:
    """``name`` itself if it is a candidate, else the unique candidate ending with ``"." + name``."""
    if name in candidates:
        return name, [name]
    hits = [c for c in candidates if c.endswith("." + name)]
    return (hits[0] if len(hits) == 1 else None), hits


def _saved_module_plan(
    model: nn.Module, others: Mapping[str, Tensor], entries: Sequence[str], layers: Mapping[str, LoRALayer], strict: bool
) -> list[tuple[str, Tensor, Tensor]]:
    """(name, model tensor, file tensor) for the file's tensors of PEFT's ``modules_to_save``.

    A file key belongs to a module to save when a dotted prefix of it ends
    with an entry (PEFT's ``str.endswith``); keys of no such module are left
    alone (embedding layers and the like, as before).
    """
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if not any(_under(k, n) for n in layers)}
    names = list(targets)
    plan, problems = [], []
    loaded: dict[str, set[str]] = {}
    for key, value in others.items():
        cut = next((i for i, c in enumerate(key) if c == "." and any(key[:i].endswith(e) for e in entries)), None)
        if cut is None:
            continue
        hit, hits = _resolve(key, names)
        if hit is None:
            problems.append(f"{key!r} ({'ambiguous: ' + preview(hits, 3) if hits else 'no such tensor'})")
            continue
        target = targets[hit]
        if tuple(value.shape) != tuple(target.shape):
            problems.append(f"{key!r} (shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model)")
            continue
        rest = key[cut + 1 :]
        loaded.setdefault(hit[: len(hit) - len(rest) - 1], set()).add(rest)
        plan.append((hit, target, value))
    with_lora = _containing_lora(layers)
    for module, keys in loaded.items():
        if module in with_lora:
            problems.append(f"{module!r} (a module to save that holds LoRA layers)")
        elif strict:
            missing = sorted(set(model.get_submodule(module).state_dict()) - keys)
            if missing:
                problems.append(f"{module!r} (no {preview(missing, 3)} in the file)")
    if problems:
        raise StateDictMismatchError(
            f"load_lora: the modules to save {list(entries)} of the config do not fit the model: "
            f"{'; '.join(problems[:5])}. Pass the module PEFT wrapped (e.g. pl_module.model) as `model`."
        )
    return plan


@torch.no_grad()
def load_lora(
    model: nn.Module,
    source: Mapping[str, Tensor] | str | os.PathLike,
    adapter: str | None = None,
    *,
    config: Mapping | str | os.PathLike | None = None,
    strict: bool = True,
) -> tuple[str, ...]:
    """Load LoRA factors saved by :func:`save_lora` or by HuggingFace PEFT.

    Args:
        model: a model with LoRA layers of the same rank as the file
            (``inject_lora(model, target_modules, r=...)`` first): the module
            PEFT wrapped, or a module that holds it (a LightningModule).
        source: a mapping of tensors, a ``.safetensors`` file, or a PEFT
            directory (``adapter_model.safetensors`` + ``adapter_config.json``).
            Keys may carry PEFT's ``base_model.model.`` prefix and an adapter
            segment (``lora_A.default.weight``). Pickled ``.bin`` files are refused.
        adapter: which adapter receives the weights (default: the active one);
            created on every layer when it does not exist.
        config: PEFT's adapter config (a mapping or the path of
            ``adapter_config.json``): ``r``, ``lora_alpha``, ``use_rslora``,
            ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``. When the
            file's scaling differs from the layer's ``alpha / r``, the ratio is
            folded into B, so ΔW is what the file means. Without a config (and
            without our metadata) the layer's scaling is assumed, with a warning.
        strict: require a weight for every LoRA layer, and every tensor of
            each module to save that the file holds (default True).

    Names in the file are relative to the module PEFT wrapped. They are
    matched exactly, or else by a unique suffix at a dot boundary (a file
    saved from ``bert`` loads into ``model.bert`` inside a LightningModule).
    When the config lists ``modules_to_save``, the file's tensors of those
    modules (PEFT's rule: a module whose name ends with an entry) are copied
    into the model's parameters and buffers too; other tensors that are not
    LoRA factors are ignored.

    Returns:
        The names of the LoRA layers that received weights.

    Raises:
        ConfigError: the file is not safetensors, holds DoRA or LoRA-bias
            tensors (not supported), or names several PEFT adapters.
        StateDictMismatchError: a module is unknown or ambiguous, a shape or
            rank differs, or (``strict``) a LoRA layer or a tensor of a module
            to save gets no weights.
        NonFiniteError: a tensor holds NaN or inf.

    Nothing in ``model`` is changed when an error is raised.
    """
    layers = _require_layers(model)
    tensors, cfg = _read_source(source, config)
    unsupported = [k for k in tensors if "lora_magnitude_vector" in k or re.search(r"\.lora_B(\.[^.]+)?\.bias$", k)]
    if unsupported:
        raise ConfigError(
            f"load_lora: {preview(unsupported)} belong to DoRA or to a LoRA bias, which cl-plugin's LoRA layers "
            "do not have; loading only A and B would change what the adapter computes."
        )
    factors: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    seen_adapters: set[str] = set()
    for key, value in tensors.items():
        stripped = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        m = _KEY_RE.match(stripped)
        if not m:
            others[stripped] = value  # modules_to_save, heads, ...: not LoRA factors
            continue
        adapter_segment = m.group("adapter") or m.group("eadapter")
        if adapter_segment:
            seen_adapters.add(adapter_segment)
        factors.setdefault(m.group("module"), {})[m.group("side") or m.group("eside")] = value
    if len(seen_adapters) > 1:
        raise ConfigError(
            f"load_lora: the state dict holds several PEFT adapters {sorted(seen_adapters)}; pass one adapter's tensors."
        )
    if not factors:
        raise StateDictMismatchError(
            f"load_lora: no key of the form '<module>.lora_A.weight' / '<module>.lora_B.weight' in {preview(list(tensors))}."
        )
    # map file modules to layers
    resolved: dict[str, str] = {}
    problems = []
    for module in factors:
        hit, hits = _resolve(module, list(layers))
        if hit is not None:
            resolved[module] = hit
        else:
            problems.append(f"{module!r} ({'ambiguous: ' + preview(hits, 3) if hits else 'no such LoRA layer'})")
    if problems:
        raise StateDictMismatchError(
            f"load_lora: {len(problems)} module(s) of the file do not map to a LoRA layer: {'; '.join(problems[:5])}. "
            f"The model's LoRA layers: {preview(list(layers), 10)}."
        )
    half = [m for m, fac in factors.items() if set(fac) != {"A", "B"}]
    if half:
        raise StateDictMismatchError(f"load_lora: {preview(half)} have only one of lora_A / lora_B.")
    if strict:
        missing = [n for n in layers if n not in resolved.values()]
        if missing:
            raise StateDictMismatchError(
                f"load_lora: no weights for {len(missing)} LoRA layer(s): {preview(missing)}. Pass strict=False to "
                "leave them as they are, or inject LoRA only into the layers the file covers."
            )
    if cfg is None:
        warnings.warn(
            "load_lora: no adapter config (r, lora_alpha) given; assuming the file was trained with the layers' "
            "own scaling alpha/r. Pass config='.../adapter_config.json' to be sure.",
            UserWarning,
            stacklevel=2,
        )
    plan = []
    for module, fac in factors.items():
        layer = layers[resolved[module]]
        a, b = fac["A"], fac["B"]
        shapes = layer._adapter_shapes()
        need_a, need_b = ("r", *shapes["lora_A"][1:]), (shapes["lora_B"][0], "r", *shapes["lora_B"][2:])
        if (
            a.dim() != len(need_a) or b.dim() != len(need_b)
            or tuple(a.shape[1:]) != need_a[1:] or b.shape[0] != need_b[0] or tuple(b.shape[2:]) != need_b[2:]
        ):
            show = lambda shape: "(" + ", ".join(map(str, shape)) + ")"  # noqa: E731
            raise StateDictMismatchError(
                f"load_lora: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the layer needs "
                f"{show(need_a)} and {show(need_b)}."
            )
        if a.shape[0] != b.shape[1] or a.shape[0] != layer.r:
            raise StateDictMismatchError(
                f"load_lora: {module!r} has rank {a.shape[0]} in the file but the layer has r={layer.r}. "
                f"Inject with r={a.shape[0]}."
            )
        file_scale = _file_scaling(cfg, module, int(a.shape[0]))
        ratio = 1.0 if file_scale is None else file_scale / layer.scaling
        plan.append((resolved[module], layer, a, b * ratio))
    entries = (cfg or {}).get("modules_to_save") or []
    entries = [entries] if isinstance(entries, str) else list(entries)
    saved_plan = _saved_module_plan(model, others, entries, layers, strict) if entries else []
    check_finite({f"{n}.lora_{s}": t for n, _, a, b in plan for s, t in (("A", a), ("B", b))}, "load_lora")
    check_finite({name: value for name, _, value in saved_plan}, "load_lora")
    for _, layer, _, _ in plan:
        if layer.merged_adapter is not None:
            raise ConfigError("load_lora: an adapter is merged into the weights; call unmerge_lora(model) first.")
    key = None if adapter is None else adapter_key(adapter)
    no_target = [name for name, layer, _, _ in plan if key is None and layer.active_adapter is None]
    if no_target:
        raise ConfigError(f"load_lora: {preview(no_target)} have no active adapter; pass `adapter=`.")
    for name, layer, a, b in plan:
        target = layer.active_adapter if key is None else key
        if not layer.has_adapter(target):
            layer.add_adapter(target)
        layer.lora_A[target].copy_(a)
        layer.lora_B[target].copy_(b)
    for _, target, value in saved_plan:
        target.copy_(value)
    return tuple(name for name, *_ in plan)
