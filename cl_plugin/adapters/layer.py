"""The adapter-layer base: a frozen layer plus per-adapter tensors, declared once.

Every adapter layer (the LoRA layers of :mod:`cl_plugin.adapters.lora_layer`,
Share's :class:`~cl_plugin.adapters.SharedLinear`) derives from
:class:`AdapterLayer`. A subclass declares, as PEFT's ``LoraLayer`` does with
``adapter_layer_names`` (``peft/tuners/lora/layer.py``):

* :attr:`~AdapterLayer.adapter_layer_names`: the ``nn.ParameterDict``\\ s keyed
  by adapter name (``lora_A``, ``lora_B``; Share's ``coef_a``, ``coef_b``), so a
  state-dict key reads ``<layer>.lora_A.<adapter>``;
* :attr:`~AdapterLayer.shaped_tensor_names`: single tensors whose shape a
  loaded state dict decides (Share's basis), and
  :attr:`~AdapterLayer.optional_tensor_names`, those of them that may be absent.

From the declaration the base derives what every layer needs: the adapter
names, selecting one, freezing all but one, deleting one, moving new tensors
to the base weight's device and dtype, and loading a state dict that names
adapters the layer lacks (they are created first, so a checkpoint of a
per-task run loads into a freshly wrapped model).

The forward pass computes the base layer once and adds the selected adapter's
output; inside :func:`forward_by_task` with several labels in one batch, each
adapter is applied to its own rows (PEFT's ``adapter_names=`` mixed batch).

What the base keeps of the wrapped layer: its ``weight`` and ``bias``
Parameters themselves, under the same names, so the model's state-dict keys
for them do not change (PEFT moves them to ``<module>.base_layer.weight``; we
do not). The base computation is re-done functionally by each subclass.

Plain torch only.
"""

from __future__ import annotations

import contextlib
import numbers
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cl_plugin.adapters.config import adapter_key
from cl_plugin.errors import ConfigError, NoMatchingModulesError, preview

__all__ = [
    "AdapterLayer",
    "InjectionSummary",
    "adapter_layers",
    "forward_by_task",
    "forward_routed",
    "use_adapter",
]


# -- helpers shared by the LoRA and Share injections ---------------------------------------------
def layer_generator(seed: int, *parts: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and names, identical on every process.

    Python's ``hash`` is salted per process; CRC32 is not, so every DDP rank
    draws the same numbers for the same layer.
    """
    key = ":".join((str(int(seed)), *parts)).encode()
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(key))


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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameter elements, each tensor counted once."""
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


@dataclass(frozen=True)
class InjectionSummary:
    """What :func:`~cl_plugin.adapters.inject_lora` (or ``SharedSubspace.inject``) changed.

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


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype to multiply ``t`` in: float32 for 16-bit tensors on CPU, whose matmuls are slow and lossy (as PEFT does)."""
    return torch.float32 if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


# -- the base ----------------------------------------------------------------------------------------
class AdapterLayer(nn.Module):
    """A frozen base layer plus named adapters whose tensors are declared once.

    Subclasses declare :attr:`adapter_layer_names` (and, if any, the shaped and
    optional tensors) and implement :meth:`_base_forward`,
    :meth:`_adapter_forward` and :meth:`_adapter_shapes`.

    Args:
        base: the layer to wrap; its ``weight`` (and ``bias``, if any) become
            this layer's, frozen.
        name: the layer's module name in the model (mixed into seeds and messages).

    Attributes:
        active_adapter: the adapter ``forward`` adds (None: the base layer alone).
        layer_name: the module name given.
    """

    #: The ParameterDicts keyed by adapter name.
    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    #: Single tensors (buffers or Parameters) whose shape a loaded state dict decides.
    shaped_tensor_names: ClassVar[tuple[str, ...]] = ()
    #: Those of :attr:`shaped_tensor_names` that are None when unused (and dropped by a state dict without them).
    optional_tensor_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Module, name: str = "") -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        for store in self.adapter_layer_names:
            setattr(self, store, nn.ParameterDict())
        self.layer_name = name
        self.active_adapter: str | None = None
        self._rows: tuple[int, dict[str, Tensor]] | None = None  # set by forward_routed for a mixed batch

    # -- what subclasses implement -----------------------------------------------------------------
    def _base_forward(self, x: Tensor) -> Tensor:
        """The wrapped layer's output."""
        raise NotImplementedError

    def _adapter_forward(self, x: Tensor, key: str) -> Tensor:
        """Adapter ``key``'s contribution to the output for input rows ``x``."""
        raise NotImplementedError

    def _adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of a new adapter's tensor in each of :attr:`adapter_layer_names`."""
        raise NotImplementedError

    def _selected_output(self, x: Tensor) -> Tensor | None:
        """What ``forward`` adds to the base output outside a mixed batch (default: the active adapter's)."""
        key = self.active_adapter
        return None if key is None else self._adapter_forward(x, key)

    # -- adapters, from the declaration ----------------------------------------------------------------
    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapter names, in creation order."""
        return tuple(getattr(self, self.adapter_layer_names[0]).keys())

    def has_adapter(self, key: str) -> bool:
        return key in getattr(self, self.adapter_layer_names[0])

    def _factory(self) -> dict[str, Any]:
        """Device and dtype of new adapter tensors: the base weight's (float32 for an integer weight)."""
        dtype = self.weight.dtype if self.weight.is_floating_point() else torch.float32
        return {"device": self.weight.device, "dtype": dtype}

    def _new_parameter(self, value: Tensor, trainable: bool = False) -> nn.Parameter:
        """A Parameter holding a copy of ``value`` on the base weight's device and dtype."""
        return nn.Parameter(value.detach().to(**self._factory()).clone(), requires_grad=trainable)

    def _allocate_adapter(self, key: str) -> None:
        """Create adapter ``key`` with uninitialised, frozen tensors of :meth:`_adapter_shapes`."""
        factory = self._factory()
        for store, shape in self._adapter_shapes().items():
            getattr(self, store)[key] = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)

    def _require(self, name: str | int | None) -> str:
        """``name`` as a key of an existing adapter (None: the active one)."""
        key = self.active_adapter if name is None else adapter_key(name)
        if key is None:
            raise ConfigError("No adapter is active on this layer; name one with `adapter=`.")
        if not self.has_adapter(key):
            raise ConfigError(f"Unknown adapter {key!r}; this layer has {list(self.adapters)}.")
        return key

    def adapter_tensors(self, name: str | int | None = None) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors (default: the active one), keyed as in the layer's state dict."""
        key = self._require(name)
        return {f"{store}.{key}": getattr(self, store)[key] for store in self.adapter_layer_names}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter's Parameters."""
        return [p for store in self.adapter_layer_names for p in getattr(self, store).values()]

    def set_active(self, name: str | int | None) -> None:
        """Use adapter ``name`` in ``forward`` (``None``: the base layer alone). Does not change ``requires_grad``."""
        self.active_adapter = None if name is None else self._require(name)

    def set_trainable(self, name: str | int | None) -> None:
        """Make adapter ``name`` the only trainable one (``None``: freeze every adapter)."""
        key = None if name is None else self._require(name)
        for store in self.adapter_layer_names:
            for n, p in getattr(self, store).items():
                p.requires_grad_(n == key)

    def delete_adapter(self, name: str | int) -> None:
        """Remove adapter ``name``; the layer then uses no adapter if it was the active one."""
        key = self._require(name)
        for store in self.adapter_layer_names:
            del getattr(self, store)[key]
        if self.active_adapter == key:
            self.active_adapter = None

    def selection(self) -> object:
        """What :meth:`restore_selection` needs to put the current selection back."""
        return self.active_adapter

    def restore_selection(self, token: object) -> None:
        self.set_active(token)  # type: ignore[arg-type]

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        result = self._base_forward(x)
        if self._rows is not None:
            return self._mixed_batch_forward(x, result)
        delta = self._selected_output(x)
        # In place: the base output is a fresh tensor that no backward pass needs (linear, convolution
        # and embedding save their inputs, not their outputs), and a copy the size of the output is saved.
        return result if delta is None else result.add_(delta.to(result.dtype))

    def _mixed_batch_forward(self, x: Tensor, result: Tensor) -> Tensor:
        """The base output once, plus each adapter's output on its own rows (rows of no adapter: base only)."""
        n_rows, groups = self._rows
        if x.shape[0] != n_rows:
            raise ConfigError(
                f"{type(self).__name__} {self.layer_name!r} sees a first dimension of {x.shape[0]}, not the batch of "
                f"{n_rows} that forward_by_task labelled: the model reshapes the batch before this layer. Pass one "
                "task label per batch for such a model."
            )
        for key, index in groups.items():
            if not self.has_adapter(key):
                continue
            index = index.to(x.device)
            delta = self._adapter_forward(x.index_select(0, index), key)
            result.index_add_(0, index, delta.to(result.dtype))
        return result

    # -- state dict --------------------------------------------------------------------------------------
    def _reshape_tensor(self, name: str, shape: torch.Size) -> None:
        """Give tensor ``name`` (one of :attr:`shaped_tensor_names`) an uninitialised value of ``shape``."""
        current = getattr(self, name)
        if current is not None and current.shape == shape:
            return
        value = torch.empty(shape, **self._factory())
        if name in self._buffers:
            self._buffers[name] = value
        else:
            setattr(self, name, nn.Parameter(value, requires_grad=False))

    def _prepare_state(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Shape this layer like the state dict about to load into it."""
        for name in self.shaped_tensor_names:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor):
                self._reshape_tensor(name, value.shape)
            elif name in self.optional_tensor_names and getattr(self, name) is not None:
                setattr(self, name, None)
        named = []
        for store in self.adapter_layer_names:
            head = f"{prefix}{store}."
            named += [k[len(head) :] for k, v in state_dict.items() if k.startswith(head) and isinstance(v, Tensor)]
        for key in dict.fromkeys(named):
            if key and "." not in key and not self.has_adapter(key):
                self._allocate_adapter(key)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._prepare_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


# -- model-level selection and the one forward_by_task -------------------------------------------------
def adapter_layers(model: nn.Module, kind: type[AdapterLayer] = AdapterLayer) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` (of type ``kind``: default LoRA or Share), by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def require_layers(
    model: nn.Module,
    kind: type[AdapterLayer] = AdapterLayer,
    missing: str = "has no adapter layers (LoRA or Share); inject adapters first.",
) -> dict[str, AdapterLayer]:
    """:func:`adapter_layers`, or NoMatchingModulesError("<model class> ``missing``") when there is none."""
    layers = adapter_layers(model, kind)
    if not layers:
        raise NoMatchingModulesError(f"{type(model).__name__} {missing}")
    return layers


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | int | None) -> Iterator[None]:
    """Within the block, every adapter layer (LoRA or Share) uses adapter/task ``name`` (``None``: none).

    The previous selection is restored on exit; ``requires_grad`` is not touched.

    Raises:
        ConfigError: a layer has no adapter ``name`` (nothing is changed then).
    """
    layers = list(require_layers(model).values())
    key = None if name is None else adapter_key(name, "task label")
    if key is not None:
        missing = [layer.layer_name or type(layer).__name__ for layer in layers if not layer.has_adapter(key)]
        if missing:
            raise ConfigError(f"Adapter {key!r} does not exist on {preview(missing)}; adapters: {list(layers[0].adapters)}.")
    before = [layer.selection() for layer in layers]
    try:
        for layer in layers:
            layer.set_active(key)
        yield
    finally:
        for layer, token in zip(layers, before):
            layer.restore_selection(token)


def forward_routed(
    model: nn.Module, inputs: Tensor, keys: Sequence[str | None], *, call: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """``model(inputs)`` with adapter ``keys[i]`` on row i (None: no adapter), in one pass.

    The keys must name adapters every layer has, or be None. One distinct key
    is a plain pass with that adapter selected; several set a row plan on
    every adapter layer for the pass, and each layer computes its base output
    once and adds each adapter's output to its rows. ``call`` runs the pass
    (default ``model``; e.g. a ``torch.func.functional_call`` of it).
    """
    call = model if call is None else call
    layers = list(require_layers(model).values())
    if len(keys) != inputs.shape[0]:
        raise ConfigError(f"Got {len(keys)} task labels for a batch of {inputs.shape[0]}; pass one per sample.")
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == 1:
        with use_adapter(model, distinct[0]):
            return call(inputs)
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    plan = (len(keys), {k: torch.tensor(rows, device=inputs.device) for k, rows in groups.items()})
    for layer in layers:
        layer._rows = plan
    try:
        return call(inputs)
    finally:
        for layer in layers:
            layer._rows = None


def labels_to_keys(task_labels: Any, batch_size: int) -> list[str] | None:
    """One adapter key per sample from one label, one per sample, or None (no labels)."""
    if task_labels is None:
        return None
    if isinstance(task_labels, (str, numbers.Integral)) or (isinstance(task_labels, Tensor) and task_labels.dim() == 0):
        return [adapter_key(task_labels, "task label")] * batch_size
    labels = task_labels.tolist() if isinstance(task_labels, Tensor) else list(task_labels)
    if len(labels) != batch_size:
        raise ConfigError(f"Got {len(labels)} task labels for a batch of {batch_size}; pass one per sample.")
    return [adapter_key(label, "task label") for label in labels]


def forward_by_task(model: nn.Module, inputs: Tensor, task_labels: Tensor | Sequence[int | str] | int | str) -> Tensor:
    """Run ``model`` with the adapter named by each sample's task label, in one pass.

    The contract shared with ``LoRAAdapters.forward_by_task`` and
    ``SharedSubspaceAdapters.forward_by_task``: label ``k`` selects adapter (or
    Share task) ``"k"``; a label that names no adapter of the model runs that
    sample through the base model alone. That is what evaluating a stream
    needs: the tasks not trained yet have no adapter, and their accuracy (for
    forward transfer) is the base model's. A batch with several labels is not
    split: every adapter layer computes its base output once and adds each
    adapter's output to its own rows. Meant for evaluation: in training mode,
    layers with batch statistics (BatchNorm) see the whole batch.

    Args:
        model: a model with LoRA or Share layers.
        inputs: a tensor whose first dimension is the batch.
        task_labels: one label for the batch, or one per sample (tensor or sequence).

    Returns:
        The model's output.

    Raises:
        ConfigError: the number of labels differs from the batch size, or an
            adapter layer sees another first dimension than the batch.

    Example:
        >>> from cl_plugin.adapters import inject_lora
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> _ = inject_lora(net, ["0"], r=1, adapter_name="0")
        >>> with torch.no_grad():
        ...     _ = net[0].lora_B["0"].fill_(1.0)
        ...     out = forward_by_task(net, torch.ones(2, 2), [0, 7])  # no adapter "7": the base model
        >>> torch.equal(out[1], net[0]._base_forward(torch.ones(2))), torch.equal(out[0], out[1])
        (True, False)
    """
    layers = require_layers(model)
    keys = labels_to_keys(task_labels, inputs.shape[0])
    known = set.intersection(*(set(layer.adapters) for layer in layers.values()))
    return forward_routed(model, inputs, [k if k in known else None for k in keys])
