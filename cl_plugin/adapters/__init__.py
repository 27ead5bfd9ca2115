"""Parameter-efficient adapters for continual learning: LoRA and Share.

- :mod:`~cl_plugin.adapters.config`: :class:`LoRAConfig` and :class:`ShareConfig`,
  the options, checked once.
- :mod:`~cl_plugin.adapters.layer`: :class:`AdapterLayer`, the base of every
  adapter layer (per-adapter tensors declared once), and the one
  :func:`forward_by_task` (a mixed-label batch in one pass).
- :mod:`~cl_plugin.adapters.lora_layer`: the LoRA layers, one per layer type
  (``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d``, ``nn.Embedding``).
- :mod:`~cl_plugin.adapters.lora`: LoRA on a whole model: injection by module
  name, ΔW as task vectors, per-task adapters, merge/unmerge.
- :mod:`~cl_plugin.adapters.io`: LoRA adapters on disk in HuggingFace PEFT's
  format: :func:`save_lora` writes what ``PeftModel.from_pretrained`` loads,
  :func:`load_lora` reads PEFT's adapters and ours.
- :mod:`~cl_plugin.adapters.share`: Share, one shared low-rank basis per layer
  with tiny per-task coefficients (:class:`SharedSubspace`).
- :mod:`~cl_plugin.adapters.matching`: the PEFT name-matching rule all of them use.

Plain torch only; the Lightning callbacks build on these functions. The user
guide is ``docs/adapters.md``.
"""

from cl_plugin.adapters.config import LAYER_TYPES, LoRAConfig, ShareConfig
from cl_plugin.adapters.layer import AdapterLayer, InjectionSummary, adapter_layers, forward_by_task, use_adapter
from cl_plugin.adapters.lora_layer import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear
from cl_plugin.adapters.lora import (
    VIT_TARGET_MODULES,
    active_adapter,
    add_adapter,
    adapter_bytes,
    adapter_names,
    delete_adapter,
    inject_lora,
    load_lora_delta,
    lora_delta,
    lora_layers,
    merge_lora,
    reset_lora,
    set_active_adapter,
    unload_lora,
    unmerge_lora,
)
from cl_plugin.adapters.io import load_lora, lora_state_dict, save_lora
from cl_plugin.adapters.matching import MatchResult, inspect_matches, match_modules, match_name
from cl_plugin.adapters.share import SharedLinear, SharedSubspace, fit_basis

__all__ = [
    "VIT_TARGET_MODULES",
    "LAYER_TYPES",
    "LoRAConfig",
    "ShareConfig",
    "AdapterLayer",
    "InjectionSummary",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv1D",
    "LoRAConv2d",
    "LoRAEmbedding",
    "SharedLinear",
    "SharedSubspace",
    "MatchResult",
    "inject_lora",
    "adapter_layers",
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
    "fit_basis",
    "match_modules",
    "match_name",
    "inspect_matches",
]
