"""Task vectors: the difference between fine-tuned and starting weights.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023
(https://arxiv.org/abs/2212.04089): a task vector is τ = θ_finetuned − θ_base,
and θ_base + λ·τ moves a model toward the task.

Only floating-point tensors take part. Integer and boolean buffers (position
ids, BatchNorm's ``num_batches_tracked``) have no meaningful difference; they are
left out, listed in :attr:`TaskVector.skipped`, and pass through
:meth:`TaskVector.apply_to` unchanged.
"""

from __future__ import annotations

import fnmatch
import json
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from cl_plugin._checks import check_finite, check_same_layout
from cl_plugin.errors import ConfigError, NoMatchingModulesError, StateDictMismatchError, preview

__all__ = ["TaskVector", "select_names"]

_FORMAT = "cl_plugin.TaskVector"
_FORMAT_VERSION = "1"

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


class TaskVector(Mapping[str, Tensor]):
    """A mapping from parameter name to the tensor θ_finetuned − θ_base.

    Build one with :meth:`between`, or wrap any mapping of name to tensor. The
    tensors are held, not copied; arithmetic returns a new ``TaskVector``.

    Args:
        tensors: name -> tensor. Non-floating-point entries are left out and
            listed in :attr:`skipped`.
        skipped: names already left out upstream, to carry along in :attr:`skipped`.
        check_finite: raise :class:`~cl_plugin.errors.NonFiniteError` if a
            tensor holds NaN or inf (default True).

    Raises:
        ConfigError: a value is not a tensor.
        NonFiniteError: a tensor holds NaN or infinity.

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

    __slots__ = ("_tensors", "_skipped")

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        skipped: Iterable[str] = (),
        check_finite: bool = True,
    ) -> None:
        if isinstance(tensors, TaskVector):
            skipped = (*tensors.skipped, *skipped)
        if not isinstance(tensors, Mapping):
            raise ConfigError(f"A TaskVector wraps a mapping of name to tensor, got {type(tensors).__name__}.")
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
        if check_finite:
            _check_finite_fn(floats, "TaskVector")
        self._tensors = floats
        self._skipped = tuple(dict.fromkeys(left_out))

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

        Args:
            finetuned: state dict or module after fine-tuning.
            base: state dict or module before fine-tuning (θ₀).
            include: glob patterns of names to keep (default all), e.g. ``"blocks.*"``.
            exclude: glob patterns of names to drop, e.g. ``("head.*", "*.bias")``.

        Returns:
            A TaskVector on ``finetuned``'s devices, in its dtypes.

        Raises:
            StateDictMismatchError: names or shapes of the selected tensors differ.
            DtypeMismatchError: a selected tensor has another dtype in ``base``.
            NonFiniteError: the difference holds NaN or infinity.
            NoMatchingModulesError: the patterns leave nothing.
        """
        ft = _as_state_dict(finetuned, "`finetuned`")
        b = _as_state_dict(base, "`base`")
        float_names = [n for n, t in b.items() if isinstance(t, Tensor) and t.is_floating_point()]
        names = select_names(float_names, include, exclude)
        skipped = [n for n in b if n not in names]
        ft_selected = {}
        for n, t in ft.items():
            if n in names:
                ft_selected[n] = t
            elif isinstance(t, Tensor) and t.is_floating_point() and n not in b:
                ft_selected[n] = t  # reported as unexpected below
        check_same_layout({n: b[n] for n in names}, ft_selected, "TaskVector.between(finetuned, base)")
        with torch.no_grad():
            diff = {n: torch.sub(ft[n].detach(), b[n].detach().to(ft[n].device)) for n in names}
        _check_finite_fn(diff, "TaskVector.between(finetuned, base)")
        return cls(diff, skipped=skipped, check_finite=False)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TaskVector:
        """Read a task vector written by :meth:`save` (or any safetensors file of floats).

        safetensors cannot run code on load, unlike a pickle, so files from
        others are safe to open.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No task vector file at {path!r}.")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path, device=str(device))
        # safetensors stores tensors by offset, not in the order they were given.
        names = json.loads(metadata.get("names", "null"))
        if isinstance(names, list) and sorted(names) == sorted(tensors):
            tensors = {n: tensors[n] for n in names}
        skipped = json.loads(metadata.get("skipped", "[]"))
        return cls(tensors, skipped=skipped)

    # -- Mapping protocol ---------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Names left out because they are not floating point (or were excluded)."""
        return self._skipped

    def numel(self) -> int:
        """Total number of elements over all tensors."""
        return sum(t.numel() for t in self._tensors.values())

    def __repr__(self) -> str:
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in self._tensors.values()})
        devices = sorted({str(t.device) for t in self._tensors.values()})
        text = f"TaskVector({len(self)} tensors, {self.numel():,} elements, dtype={'/'.join(dtypes) or '-'}, device={'/'.join(devices) or '-'}"
        if self._skipped:
            text += f", skipped {len(self._skipped)}: {preview(self._skipped, 3)}"
        return text + ")"

    # -- arithmetic -----------------------------------------------------------
    def _combine(self, other: object, op, symbol: str) -> TaskVector:
        if not isinstance(other, Mapping):
            return NotImplemented
        other_tv = other if isinstance(other, TaskVector) else TaskVector(other)
        check_same_layout(self._tensors, other_tv._tensors, f"TaskVector {symbol} TaskVector")
        with torch.no_grad():
            out = {n: op(t, other_tv[n].to(t.device)) for n, t in self._tensors.items()}
        return TaskVector(out, skipped=(*self._skipped, *other_tv.skipped), check_finite=False)

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
        return TaskVector(out, skipped=self._skipped, check_finite=False)

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
        """Euclidean (Frobenius) norm over all elements of all tensors, as a Python float."""
        total = 0.0
        for t in self._tensors.values():
            total += float(torch.linalg.vector_norm(t, dtype=torch.float32 if t.element_size() < 4 else None)) ** 2
        return math.sqrt(total)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TaskVector:
        """Return a copy on ``device`` and/or in floating-point ``dtype``."""
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigError(f"A task vector holds floating-point tensors; `dtype` must be a float dtype, got {dtype}.")
        out = {n: t.to(device=device, dtype=dtype) for n, t in self._tensors.items()}
        return TaskVector(out, skipped=self._skipped, check_finite=False)

    # -- use --------------------------------------------------------------------
    def apply_to(self, base: StateDictLike, scale: float = 1.0):
        """Return ``base + scale·τ``.

        Args:
            base: a state dict, or an ``nn.Module`` to update in place.
            scale: the factor λ (default 1.0); any finite real number.

        Returns:
            For a mapping: a new dict with every entry of ``base``; the entries
            of τ are new tensors in ``base``'s dtype and device, the others are
            ``base``'s own tensors. For a module: the same module, updated in place.

        Raises:
            StateDictMismatchError: a name of τ is missing from ``base``, or a shape differs.
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
        check_same_layout(
            {n: self._tensors[n] for n in self._tensors},
            {n: target[n] for n in self._tensors},
            "TaskVector.apply_to",
            check_dtype=False,
        )
        with torch.no_grad():
            if isinstance(base, nn.Module):
                for n, delta in self._tensors.items():
                    dest = target[n]
                    dest.add_(delta.to(device=dest.device, dtype=dest.dtype), alpha=scale)
                return base
            out = dict(target)
            for n, delta in self._tensors.items():
                dest = target[n]
                out[n] = torch.add(dest, delta.to(device=dest.device, dtype=dest.dtype), alpha=scale)
            return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the tensors to ``path`` as safetensors, with their names in order and the skipped names as metadata."""
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
            "format_version": _FORMAT_VERSION,
            "names": json.dumps(list(self._tensors)),
            "skipped": json.dumps(list(self._skipped)),
        }
        save_file(tensors, os.fspath(path), metadata=metadata)


_check_finite_fn = check_finite
