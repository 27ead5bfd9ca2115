"""Task vectors: the difference between fine-tuned and starting weights.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023
(https://arxiv.org/abs/2212.04089): a task vector is τ = θ_finetuned − θ_base,
and θ_base + λ·τ moves a model toward the task.

Only floating-point tensors take part. Integer and boolean buffers (position
ids, BatchNorm's ``num_batches_tracked``) have no meaningful difference; they are
left out, listed in :attr:`TaskVector.skipped`, and pass through
:meth:`TaskVector.apply_to` unchanged.

Tied weights (GPT-2, BERT and T5 share the output layer's weight with the
embedding) are one tensor listed under two names in ``module.state_dict()``.
A task vector holds such a tensor once, under the first name (the canonical
one), and records the other names in :attr:`TaskVector.aliases`: it is
counted, merged and applied once, and :meth:`TaskVector.apply_to` writes the
result under every name. See :func:`tied_aliases`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor, nn

from cl_plugin._checks import check_finite, check_same_aliases, check_same_layout, tensor_norm
from cl_plugin._io import atomic_output
from cl_plugin._packed import packed_like
from cl_plugin.errors import CheckpointError, ConfigError, NoMatchingModulesError, StateDictMismatchError, preview

__all__ = ["TaskVector", "select_names", "tied_aliases"]

_FORMAT = "cl_plugin.TaskVector"
#: The version of the safetensors metadata that :meth:`TaskVector.save` writes
#: (stored as a string: safetensors metadata maps strings to strings).
_FORMAT_VERSION = 1

StateDictLike = Mapping[str, Tensor] | nn.Module


def _as_state_dict(obj: StateDictLike, what: str) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise ConfigError(f"{what} must be a state dict (a mapping of name to tensor) or an nn.Module, got {type(obj).__name__}.")


def _patterns(value: str | Iterable[str] | None, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ConfigError(f"`{name}` must be a glob pattern or a list of them, got {value!r}.") from None
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"`{name}` must hold glob patterns (strings), got {p!r} in {value!r}.")
    return patterns


def _view_key(tensor: Tensor) -> tuple | None:
    """What makes two tensors the same view of the same memory, or None where that cannot be told."""
    if tensor.numel() == 0 or tensor.device.type == "meta" or tensor.layout != torch.strided:
        return None  # no memory (every empty or meta tensor reports address 0), or no strides (sparse)
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage (e.g. DTensor)
        return None
    return (tensor.device, tensor.dtype, pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())


def _same_view(a: Tensor, b: Tensor) -> bool:
    key = _view_key(a)
    return key is not None and key == _view_key(b)


def tied_aliases(state: Mapping[str, Tensor]) -> dict[str, str]:
    """The tied entries of a state dict: alias name -> canonical name.

    Two entries are tied when they are the same view of the same memory:
    the same storage, storage offset, shape, stride, dtype and device, as
    ``module.state_dict()`` lists a weight shared by two modules (an output
    layer tied to the embedding). The first name in ``state``'s order is the
    canonical one. Views that only overlap (a slice, a transpose) are not
    ties; entries that are not tensors, empty tensors and meta tensors are
    never tied.

    Example:
        >>> w = torch.zeros(3, 2)
        >>> tied_aliases({"embed.weight": w, "bias": torch.zeros(2), "head.weight": w, "head_t": w.T})
        {'head.weight': 'embed.weight'}
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor):
            continue
        key = _view_key(tensor)
        if key is None:
            continue
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def select_names(
    names: Sequence[str],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """Filter ``names`` with shell-style glob patterns (``fnmatch``, case-sensitive).

    Args:
        names: candidate tensor names, e.g. ``"blocks.0.attn.qkv.weight"``.
        include: keep only names matching one of these patterns (default: all).
        exclude: then drop names matching one of these patterns (default: none).

    Returns:
        The kept names, in their original order.

    Raises:
        NoMatchingModulesError: an ``include`` pattern matched nothing, or nothing is left.
        ConfigError: a pattern is not a string.

    Warns:
        UserWarning: an ``exclude`` pattern matched nothing (usually a typo).
    """
    include_p = _patterns(include, "include")
    exclude_p = _patterns(exclude, "exclude")
    for p in include_p:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise NoMatchingModulesError(
                f"`include` pattern {p!r} matches no tensor name. Some names that exist: {preview(names, 10)}."
            )
    for p in exclude_p:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            warnings.warn(f"`exclude` pattern {p!r} matches no tensor name; it has no effect.", stacklevel=3)
    kept = [
        n
        for n in names
        if (not include_p or any(fnmatch.fnmatchcase(n, p) for p in include_p))
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude_p)
    ]
    if not kept:
        raise NoMatchingModulesError(
            f"No tensor is left after include={list(include_p)} and exclude={list(exclude_p)}; "
            f"the candidates were {preview(names, 10)}."
        )
    return kept


def norm_of_norms(norms: Iterable[float]) -> float:
    """The norm of several tensors together from their own norms (finite where they are, even past a double's squares)."""
    norms = list(norms)
    total = 0.0
    for value in norms:
        total += value * value
    if math.isinf(total) and all(math.isfinite(v) for v in norms):
        return math.hypot(*norms)  # the squares overflow a double; hypot does not
    return math.sqrt(total)


class TaskVector(Mapping[str, Tensor]):
    """A mapping from parameter name to the tensor θ_finetuned − θ_base.

    Build one with :meth:`between`, or wrap any mapping of name to tensor. The
    tensors are held, not copied; arithmetic returns a new ``TaskVector``.

    Args:
        tensors: name -> tensor. Non-floating-point entries are left out and
            listed in :attr:`skipped`. Entries that are the same view of the
            same memory as an earlier entry (tied weights) are held once and
            recorded in :attr:`aliases`.
        skipped: names already left out upstream, to carry along in :attr:`skipped`.
        aliases: tied names found upstream, alias -> canonical name (default
            none). Each canonical name must be among ``tensors``; an alias may
            be among them too if it holds the same values, and is then dropped.
        check_finite: raise :class:`~cl_plugin.errors.NonFiniteError` if a
            tensor holds NaN or inf (default True).

    Raises:
        ConfigError: a value is not a tensor, or ``aliases`` is not a mapping of
            names to names (or ties a name to itself or to another alias).
        StateDictMismatchError: an alias's canonical tensor is missing, or an
            alias holds other values than its canonical tensor.
        NonFiniteError: a tensor holds NaN or infinity.

    A tied name can be read (``tv["head.weight"]`` gives the canonical
    tensor, and ``"head.weight" in tv`` is True) but is not listed: iteration,
    ``len``, :meth:`numel`, :meth:`norm`, arithmetic and the mergers see each
    tensor once.

    Example:
        >>> base = {"w": torch.zeros(2, 2), "step": torch.tensor(3)}
        >>> tuned = {"w": torch.tensor([[1., -2.], [0., 4.]]), "step": torch.tensor(9)}
        >>> tv = TaskVector.between(tuned, base)
        >>> tv["w"]
        tensor([[ 1., -2.],
                [ 0.,  4.]])
        >>> tv.skipped
        ('step',)
        >>> tv.apply_to(base, scale=0.5)["w"]
        tensor([[ 0.5000, -1.0000],
                [ 0.0000,  2.0000]])
    """

    __slots__ = ("_tensors", "_skipped", "_aliases", "_finite_stamp")

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        skipped: Iterable[str] = (),
        aliases: Mapping[str, str] | None = None,
        check_finite: bool = True,
    ) -> None:
        given: dict[str, str] = {}
        if isinstance(tensors, TaskVector):
            skipped = (*tensors.skipped, *skipped)
            given.update(tensors.aliases)
        if not isinstance(tensors, Mapping):
            raise ConfigError(f"A TaskVector wraps a mapping of name to tensor, got {type(tensors).__name__}.")
        if aliases is not None:
            given.update(_check_aliases_argument(aliases))
        floats: dict[str, Tensor] = {}
        left_out = list(skipped)
        for name, value in tensors.items():
            if not isinstance(value, Tensor):
                raise ConfigError(
                    f"Entry {name!r} is a {type(value).__name__}, not a tensor. A task vector maps names to tensors."
                )
            if value.is_floating_point():
                floats[name] = value.detach()
            else:
                left_out.append(name)
        for alias, canonical in given.items():
            if canonical in given:
                raise ConfigError(
                    f"`aliases` ties {alias!r} to {canonical!r}, which is itself an alias of {given[canonical]!r}; "
                    f"tie it to {given[canonical]!r}."
                )
            if canonical not in floats:
                raise StateDictMismatchError(
                    f"`aliases` ties {alias!r} to {canonical!r}, which is not a floating-point tensor of the task vector."
                )
        for alias, canonical in given.items():
            if alias in floats:
                value, ref = floats.pop(alias), floats[canonical]
                if not (_same_view(value, ref) or _same_values(value, ref)):
                    raise StateDictMismatchError(
                        f"`aliases` ties {alias!r} to {canonical!r}, but the tensors under the two names differ. "
                        "Tied weights are one tensor: pass it once, under the canonical name."
                    )
        detected = tied_aliases(floats)
        for alias in detected:
            del floats[alias]
        if check_finite:
            _check_finite_fn(floats, "TaskVector")
        self._tensors = floats
        self._skipped = tuple(dict.fromkeys(left_out))
        self._aliases = {**given, **detected}
        # Set only by the boundary core, between forming a task vector and folding it (no user
        # code runs in between): see _stamp_finite.
        self._finite_stamp: dict[str, tuple[int, int]] = {}

    # -- known finiteness --------------------------------------------------
    def _stamp_finite(self) -> None:
        """Record that every tensor has just been checked finite (see :meth:`_known_finite`).

        For the library's own use only, on tensors it has just made and not
        handed out: a write through ``.data``, NumPy or DLPack does not
        advance a version counter, so a stamp on tensors a user holds could
        vouch for a NaN written that way. Inference tensors keep no version
        counter and are never stamped.
        """
        if any(t.is_inference() for t in self._tensors.values()):
            self._finite_stamp = {}
            return
        self._finite_stamp = {n: (t.data_ptr(), t._version) for n, t in self._tensors.items()}

    def _forget_finite(self) -> None:
        """Drop the record of :meth:`_stamp_finite` (the task vector is being handed out)."""
        self._finite_stamp = {}

    def _known_finite(self) -> bool:
        """True when every tensor was stamped finite and none has been written in place since.

        The check reads each tensor's memory address and version counter, which
        in-place operations on it (or on a view of its memory) advance, so a
        merger can skip a second pass over values already checked.
        """
        stamp = self._finite_stamp
        return bool(stamp) and all(
            stamp.get(n) == (t.data_ptr(), t._version) for n, t in self._tensors.items()
        )

    def _with_stamp_of(self, other: TaskVector) -> TaskVector:
        """This task vector, carrying ``other``'s finiteness record for the tensors they share."""
        self._finite_stamp = {n: other._finite_stamp[n] for n in self._tensors if n in other._finite_stamp}
        if len(self._finite_stamp) != len(self._tensors):
            self._finite_stamp = {}
        return self

    # -- construction -----------------------------------------------------
    @classmethod
    def between(
        cls,
        finetuned: StateDictLike,
        base: StateDictLike,
        *,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
    ) -> TaskVector:
        """τ = finetuned − base over the floating-point tensors both share.

        Tied weights of ``finetuned`` (names that are the same view of the same
        memory, see :func:`tied_aliases`) are subtracted once, under the first
        name, and the other names are recorded in :attr:`aliases`.

        Args:
            finetuned: state dict or module after fine-tuning.
            base: state dict or module before fine-tuning (θ₀).
            include: glob patterns of names to keep (default all), e.g. ``"blocks.*"``.
            exclude: glob patterns of names to drop, e.g. ``("head.*", "*.bias")``.

        Returns:
            A TaskVector on ``finetuned``'s devices, in its dtypes.

        Raises:
            StateDictMismatchError: names or shapes of the selected tensors differ,
                or two names tied in ``finetuned`` hold different values in ``base``.
            DtypeMismatchError: a selected tensor has another dtype in ``base``.
            NonFiniteError: the difference holds NaN or infinity.
            NoMatchingModulesError: the patterns leave nothing.
        """
        ft = _as_state_dict(finetuned, "`finetuned`")
        b = _as_state_dict(base, "`base`")
        float_names = [n for n, t in b.items() if isinstance(t, Tensor) and t.is_floating_point()]
        names = select_names(float_names, include, exclude)
        selected = set(names)
        skipped = [n for n in b if n not in selected]
        ft_selected = {}
        for n, t in ft.items():
            if n in selected:
                ft_selected[n] = t
            elif isinstance(t, Tensor) and t.is_floating_point() and n not in b:
                ft_selected[n] = t  # reported as unexpected below
        check_same_layout({n: b[n] for n in names}, ft_selected, "TaskVector.between(finetuned, base)")
        aliases = tied_aliases({n: t for n, t in ft_selected.items() if n in selected})
        for alias, canonical in aliases.items():
            if not (_same_view(b[alias], b[canonical]) or _same_values(b[alias], b[canonical])):
                raise StateDictMismatchError(
                    f"TaskVector.between(finetuned, base): {alias!r} is tied to {canonical!r} in `finetuned` (one "
                    "tensor under two names), but `base` holds different values under the two names. Take θ₀ from "
                    "the same tied model, or exclude one of the names."
                )
        kept = [n for n in names if n not in aliases]
        if all(ft[n].layout == torch.strided and b[n].layout == torch.strided and not _is_dtensor(ft[n]) for n in kept):
            # Packed (one buffer per dtype and device), so a merger folds it in one pass per rule.
            diff = packed_like({n: ft[n] for n in kept}, fill=None)
            with torch.no_grad():
                for n, out in diff.items():
                    torch.sub(ft[n].detach(), b[n].detach().to(ft[n].device), out=out)
        else:  # sparse or distributed tensors keep their own kind
            diff = {n: torch.sub(ft[n].detach(), b[n].detach().to(ft[n].device)) for n in kept}
        _check_finite_fn(diff, "TaskVector.between(finetuned, base)")
        return cls(diff, skipped=skipped, aliases=aliases, check_finite=False)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TaskVector:
        """Read a task vector written by :meth:`save` (or any safetensors file of floats).

        safetensors cannot run code on load, unlike a pickle, so files from
        others are safe to open. The tied names that :meth:`save` recorded come
        back in :attr:`aliases`.

        Raises:
            FileNotFoundError: there is no file at ``path``.
            CheckpointError: the file was written by a newer cl-plugin (a
                ``format_version`` this one does not know), or its metadata is corrupt.
            NonFiniteError: a tensor holds NaN or infinity.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No task vector file at {path!r}.")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") == _FORMAT:
            version = metadata.get("format_version", "1")
            if not (version.isascii() and version.isdigit()) or int(version) < 1:
                raise CheckpointError(
                    f"Task vector file {path!r}: metadata `format_version` must be a positive integer, got "
                    f"{version!r}; the file is corrupt."
                )
            if int(version) > _FORMAT_VERSION:
                raise CheckpointError(
                    f"Task vector file {path!r} has format_version {version}, newer than this cl-plugin understands "
                    f"({_FORMAT_VERSION}); upgrade cl-plugin to read it."
                )
        names = _metadata_json(metadata, "names", None, path)
        skipped = _metadata_json(metadata, "skipped", [], path)
        aliases = _metadata_json(metadata, "aliases", {}, path)
        if not isinstance(skipped, list) or not all(isinstance(n, str) for n in skipped):
            raise CheckpointError(f"Task vector file {path!r}: metadata `skipped` must be a list of names, got {skipped!r}.")
        if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise CheckpointError(
                f"Task vector file {path!r}: metadata `aliases` must map names to names, got {aliases!r}."
            )
        tensors = load_file(path, device=str(device))
        for alias, canonical in aliases.items():
            if alias in tensors or canonical not in tensors or not tensors[canonical].is_floating_point():
                raise CheckpointError(
                    f"Task vector file {path!r}: metadata `aliases` ties {alias!r} to {canonical!r}, but the file "
                    f"{'holds a tensor named ' + repr(alias) if alias in tensors else 'has no float tensor ' + repr(canonical)}; "
                    "it is corrupt."
                )
        # safetensors stores tensors by offset, not in the order they were given.
        if isinstance(names, list) and sorted(names) == sorted(tensors):
            tensors = {n: tensors[n] for n in names}
        return cls(tensors, skipped=skipped, aliases=aliases)

    # -- Mapping protocol ---------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[self._aliases.get(name, name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Names left out because they are not floating point (or were excluded)."""
        return self._skipped

    @property
    def aliases(self) -> Mapping[str, str]:
        """Tied names, read-only: alias -> the canonical name whose tensor they share."""
        return MappingProxyType(self._aliases)

    def numel(self) -> int:
        """Total number of elements over all tensors (a tied tensor counts once)."""
        return sum(t.numel() for t in self._tensors.values())

    def __repr__(self) -> str:
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in self._tensors.values()})
        devices = sorted({str(t.device) for t in self._tensors.values()})
        text = f"TaskVector({len(self)} tensors, {self.numel():,} elements, dtype={'/'.join(dtypes) or '-'}, device={'/'.join(devices) or '-'}"
        if self._aliases:
            text += f", tied {len(self._aliases)}: {preview(self._aliases, 3)}"
        if self._skipped:
            text += f", skipped {len(self._skipped)}: {preview(self._skipped, 3)}"
        return text + ")"

    # -- arithmetic -----------------------------------------------------------
    def _combine(self, other: object, op, symbol: str) -> TaskVector:
        if not isinstance(other, Mapping):
            return NotImplemented
        if isinstance(other, TaskVector):
            other_tv = other
        else:
            # A plain mapping says nothing about ties: read it in this vector's terms.
            other_tv = TaskVector(other, aliases={a: c for a, c in self._aliases.items() if c in other})
        what = f"TaskVector {symbol} TaskVector"
        check_same_layout(self._tensors, other_tv._tensors, what)
        check_same_aliases(self._aliases, other_tv.aliases, what)
        with torch.no_grad():
            out = {n: op(t, other_tv[n].to(t.device)) for n, t in self._tensors.items()}
        return TaskVector(out, skipped=(*self._skipped, *other_tv.skipped), aliases=self._aliases, check_finite=False)

    def __add__(self, other: object) -> TaskVector:
        return self._combine(other, torch.add, "+")

    def __radd__(self, other: object) -> TaskVector:
        # sum([tv1, tv2]) starts from 0.
        if isinstance(other, numbers.Number) and other == 0:
            return self
        return self._combine(other, torch.add, "+")

    def __sub__(self, other: object) -> TaskVector:
        return self._combine(other, torch.sub, "-")

    def __mul__(self, scalar: object) -> TaskVector:
        if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
            return NotImplemented
        value = float(scalar)
        if not math.isfinite(value):
            raise ConfigError(f"Cannot scale a TaskVector by {scalar!r}: the factor must be finite.")
        with torch.no_grad():
            out = {n: t * value for n, t in self._tensors.items()}
        return TaskVector(out, skipped=self._skipped, aliases=self._aliases, check_finite=False)

    __rmul__ = __mul__

    def __truediv__(self, scalar: object) -> TaskVector:
        if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
            return NotImplemented
        if float(scalar) == 0.0:
            raise ConfigError("Cannot divide a TaskVector by zero.")
        return self * (1.0 / float(scalar))

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def norm(self) -> float:
        """Euclidean (Frobenius) norm over all elements of all tensors, as a Python float.

        Each tied tensor counts once. Finite whenever the entries are, even
        where the norm itself exceeds the tensors' dtype (it is a Python float).
        """
        return norm_of_norms(tensor_norm(t) for t in self._tensors.values())

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TaskVector:
        """Return a copy on ``device`` and/or in floating-point ``dtype`` (the aliases are kept)."""
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigError(f"A task vector holds floating-point tensors; `dtype` must be a float dtype, got {dtype}.")
        out = {n: t.to(device=device, dtype=dtype) for n, t in self._tensors.items()}
        return TaskVector(out, skipped=self._skipped, aliases=self._aliases, check_finite=False)

    # -- use --------------------------------------------------------------------
    def apply_to(self, base: StateDictLike, scale: float = 1.0):
        """Return ``base + scale·τ``.

        Each tied tensor moves once, by ``scale·τ``: in a mapping, the result
        for the canonical name is also put, as the same tensor object, under
        each of its :attr:`aliases` that ``base`` has; in a module, a tensor
        that the module ties under several names is updated once, and an alias
        that the module does not tie is given a copy of the result.

        Args:
            base: a state dict, or an ``nn.Module`` to update in place.
            scale: the factor λ (default 1.0); any finite real number.

        Returns:
            For a mapping: a new dict with every entry of ``base``; the entries
            of τ are new tensors in ``base``'s dtype and device, the others are
            ``base``'s own tensors. For a module: the same module, updated in place.

        Raises:
            StateDictMismatchError: a name of τ is missing from ``base``, or a
                shape differs, or the module ties two names to which τ gives
                different values.
            ConfigError: ``scale`` is not a finite real number.
        """
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
            raise ConfigError(f"`scale` must be a finite real number, got {scale!r}.")
        scale = float(scale)
        target = _as_state_dict(base, "`base`")
        missing = [n for n in self._tensors if n not in target]
        if missing:
            raise StateDictMismatchError(
                f"TaskVector.apply_to: {len(missing)} name(s) of the task vector are not in the base: "
                f"{preview(missing)}. Some names the base has: {preview(list(target), 5)}."
            )
        aliases = {a: c for a, c in self._aliases.items() if a in target}
        check_same_layout(
            {**self._tensors, **{a: self._tensors[c] for a, c in aliases.items()}},
            {n: target[n] for n in (*self._tensors, *aliases)},
            "TaskVector.apply_to",
            check_dtype=False,
        )
        with torch.no_grad():
            if isinstance(base, nn.Module):
                # Names this vector holds separately but the module ties: one tensor, moved once.
                module_ties = tied_aliases({n: target[n] for n in self._tensors})
                for alias, canonical in module_ties.items():
                    if not _same_values(self._tensors[alias], self._tensors[canonical]):
                        raise StateDictMismatchError(
                            f"TaskVector.apply_to: the module ties {alias!r} to {canonical!r} (one tensor), but the "
                            "task vector holds different values for the two names. Build the task vector from the "
                            "tied model (TaskVector.between(finetuned_module, base) records the tie)."
                        )
                for n, delta in self._tensors.items():
                    if n not in module_ties:
                        dest = target[n]
                        dest.add_(delta.to(device=dest.device, dtype=dest.dtype), alpha=scale)
                for alias, canonical in aliases.items():
                    if not _same_view(target[alias], target[canonical]):
                        target[alias].copy_(target[canonical])
                return base
            out = dict(target)
            for n, delta in self._tensors.items():
                dest = target[n]
                out[n] = torch.add(dest, delta.to(device=dest.device, dtype=dest.dtype), alpha=scale)
            for alias, canonical in aliases.items():
                out[alias] = out[canonical]
            return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the tensors to ``path`` as safetensors.

        The metadata holds the names in order, the skipped names and the
        tied names (:attr:`aliases`); a tied tensor is stored once. The file
        is written to a temporary name and renamed over ``path`` when complete
        (:func:`cl_plugin._io.atomic_output`), so a failed save never leaves a
        partial file.
        """
        from safetensors.torch import save_file

        seen: set[int] = set()
        tensors = {}
        for n, t in self._tensors.items():
            t = t.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:  # safetensors refuses tensors that share memory
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[n] = t
        metadata = {
            "format": _FORMAT,
            "format_version": str(_FORMAT_VERSION),
            "names": json.dumps(list(self._tensors)),
            "skipped": json.dumps(list(self._skipped)),
            "aliases": json.dumps(self._aliases),
        }
        with atomic_output(path) as tmp:
            save_file(tensors, os.fspath(tmp), metadata=metadata)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` have one shape and dtype and equal entries (on any devices)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def _check_aliases_argument(aliases: object) -> dict[str, str]:
    if not isinstance(aliases, Mapping):
        raise ConfigError(f"`aliases` must be a mapping of alias name to canonical name, got {type(aliases).__name__}.")
    out = {}
    for alias, canonical in aliases.items():
        if not isinstance(alias, str) or not isinstance(canonical, str):
            raise ConfigError(f"`aliases` must map names (strings) to names, got {alias!r}: {canonical!r}.")
        if alias == canonical:
            raise ConfigError(f"`aliases` ties {alias!r} to itself.")
        out[alias] = canonical
    return out


def _metadata_json(metadata: Mapping[str, str], key: str, default, path: str):
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"Task vector file {path!r}: metadata `{key}` is not valid JSON ({err}); the file is corrupt.") from err


_check_finite_fn = check_finite


def _is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed`` DTensor (without importing torch.distributed)."""
    return type(tensor).__name__ == "DTensor"
