"""The registry of merging methods, by name (as timm registers models)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from cl_plugin.errors import ConfigError, did_you_mean

__all__ = ["MERGERS", "COMMON_OPTIONS", "register_merger", "get_merger", "merge"]

_REGISTRY: dict[str, type] = {}
#: Read-only view: method name -> merger class, sorted by name.
MERGERS: Mapping[str, type] = MappingProxyType(_REGISTRY)


def register_merger(name: str, *, override: bool = False):
    """Class decorator that registers a :class:`~cl_plugin.merging.base.Merger` under ``name``.

    Raises:
        ConfigError: ``name`` is taken and ``override`` is False.
    """

    def decorator(cls):
        if name in _REGISTRY and not override:
            raise ConfigError(
                f"A merger named {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                "pass override=True to replace it."
            )
        cls.name = name
        entries = dict(_REGISTRY)
        entries[name] = cls
        _REGISTRY.clear()
        _REGISTRY.update(sorted(entries.items()))
        return cls

    return decorator


def _merger_class(name: str):
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(
            f"Unknown merging method {name!r}. Choose one of {sorted(_REGISTRY)}.{did_you_mean(str(name), _REGISTRY)}"
        )
    return _REGISTRY[name]


def option_names(cls) -> list[str]:
    """The keyword options a merger class accepts (from its constructor)."""
    params = inspect.signature(cls.__init__).parameters
    return [p for p, v in params.items() if p != "self" and v.kind is inspect.Parameter.KEYWORD_ONLY]


#: Options that every method accepts through :func:`get_merger`: DARE's drop
#: rate and seed (:mod:`cl_plugin.merging.dare`).
COMMON_OPTIONS = ("dare", "dare_seed")


def get_merger(name: str, **options):
    """Create the streaming merger ``name`` with its options.

    Args:
        name: one of :data:`MERGERS` (``"magmax"``, ``"opcm"``, ...).
        **options: method options, e.g. ``top_k=0.2`` for TIES, ``seed=0``
            for random, and for every method ``scale``, ``dare`` (DARE's drop
            rate p in [0, 1): each incoming task vector keeps an entry with
            probability 1 − p, rescaled by 1/(1 − p); None or 0: off, the
            default) and ``dare_seed`` (default 0).

    Raises:
        ConfigError: unknown method or option (the valid ones are listed), or
            a DARE option out of range.
    """
    from cl_plugin.merging.dare import check_dare

    cls = _merger_class(name)
    valid = option_names(cls)
    unknown = [k for k in options if k not in valid and k not in COMMON_OPTIONS]
    if unknown:
        hint = did_you_mean(unknown[0], [*valid, *COMMON_OPTIONS])
        raise ConfigError(
            f"Unknown option(s) {unknown} for merging method {name!r}; it accepts {valid} "
            f"(and {', '.join(f'`{o}`' for o in COMMON_OPTIONS)}, which every method accepts).{hint}"
        )
    p, seed = check_dare(options.pop("dare", None), options.pop("dare_seed", 0), f"get_merger({name!r})")
    merger = cls(**options)
    merger._configure_dare(p, seed)
    return merger


def merge(name: str, task_vectors: Iterable[Mapping], *, fishers: Iterable[Mapping] | None = None, **options):
    """Fold ``task_vectors`` in order with the method ``name``; return the merged task vector.

    The result is unscaled: apply it with ``merged.apply_to(base, scale)``
    (each method's default is ``MERGERS[name].default_scale``).

    Args:
        name: a method in :data:`MERGERS`.
        task_vectors: TaskVectors or any mappings of name to tensor, in task order.
        fishers: for a method that weighs tasks by their Fisher (``"fisher"``):
            one mapping of name to diagonal Fisher per task vector, in the same order.
        **options: method options (see :func:`get_merger`), except ``scale``.

    Raises:
        ConfigError: unknown method or option, ``scale`` passed, no task vector,
            or ``fishers`` missing, not wanted, or of another length than
            ``task_vectors``.
        StateDictMismatchError / NonFiniteError: a task vector does not fit the
            first one, holds NaN/inf, or would overflow the merge (see
            :meth:`~cl_plugin.merging.base.Merger.update` and
            :meth:`~cl_plugin.merging.base.Merger.merged`).
    """
    if "scale" in options:
        cls = _merger_class(name)
        raise ConfigError(
            f"merge() returns the unscaled merged task vector, so it takes no `scale`. Apply it with "
            f"merged.apply_to(base, scale) ({name!r}'s default scale is {cls.default_scale})."
        )
    merger = get_merger(name, **options)
    if fishers is None:
        for tv in task_vectors:
            merger.update(tv)
    else:
        pairs = iter(fishers)
        for tv in task_vectors:
            fisher = next(pairs, None)
            if fisher is None:
                raise ConfigError(f"merge({name!r}): `fishers` holds fewer entries than `task_vectors`; pass one per task.")
            merger.update(tv, fisher=fisher)
        if next(pairs, None) is not None:
            raise ConfigError(f"merge({name!r}): `fishers` holds more entries than `task_vectors`; pass one per task.")
    if merger.num_tasks == 0:
        raise ConfigError("merge() got no task vector; pass at least one.")
    return merger.merged()
