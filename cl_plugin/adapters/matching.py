"""Choosing modules by name, the way HuggingFace PEFT does.

One rule, used for every ``target_modules=``, ``exclude_modules=`` and
``trainable=`` argument of the adapters (PEFT 0.21,
``peft/tuners/tuners_utils.py::check_target_module_exists``):

- a single **string** is a regular expression that must match the *whole*
  module name (``re.fullmatch``), e.g. ``r"blocks\\.[01]\\.attn\\.qkv"``;
- a **list** (or tuple, set) of strings matches a module whose name *equals*
  an entry or *ends with* ``"." + entry``, so ``["qkv", "fc1"]`` matches
  ``blocks.0.attn.qkv`` and ``blocks.3.mlp.fc1`` but not ``blocks.0.attn.qkv2``;
- **exclusions are checked first**: a module matched by ``exclude`` is never
  selected, whatever ``include`` says.

Module names are those of :meth:`torch.nn.Module.named_modules` on the model
you pass (a LightningModule holding the network as ``self.net`` sees names
like ``net.blocks.0.attn.qkv``).

Differences from PEFT, all on the reporting side: every module is checked
before anything is raised, so one :class:`~cl_plugin.errors.NoMatchingModulesError`
lists *all* the patterns that matched nothing together with up to 10 module
names that do exist; modules whose name matches but whose type cannot be
wrapped (timm's ``patch_embed.proj`` is a ``Conv2d``) are named in the message
instead of being silently skipped; list entries that matched nothing while
others did give a warning; and :func:`inspect_matches` shows the outcome
without changing or raising anything.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from cl_plugin.errors import ConfigError, NoMatchingModulesError, did_you_mean, preview

__all__ = ["MatchResult", "Patterns", "match_name", "match_modules", "inspect_matches"]

#: A regex string (full match) or a collection of names / dotted suffixes.
Patterns = str | Sequence[str]

MatchKind = Literal["match", "excluded", "no_match"]

_MAX_CANDIDATES = 10


@dataclass(frozen=True)
class MatchResult:
    """What a set of patterns selects in a model.

    Attributes:
        matched: names of the selected modules, in ``named_modules`` order.
        excluded: names that ``include`` selects but ``exclude`` removes.
        wrong_type: ``(name, type name)`` of modules whose name matches but
            whose type is not one of the accepted ``module_types``.
        unmatched_patterns: ``include`` patterns that selected no module of an
            accepted type (the whole regex, or each list entry).
        unmatched_excludes: ``exclude`` list entries (or the regex) that
            matched no module name at all.
        candidates: every module name of an accepted type (what could have matched).
    """

    matched: tuple[str, ...]
    excluded: tuple[str, ...]
    wrong_type: tuple[tuple[str, str], ...]
    unmatched_patterns: tuple[str, ...]
    unmatched_excludes: tuple[str, ...]
    candidates: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.matched)


# -- one name ------------------------------------------------------------------
def _normalise(patterns: Patterns | None, what: str) -> str | tuple[str, ...] | None:
    """Check ``patterns`` and return a compiled-ready form (str regex or tuple of names)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        if not patterns:
            raise ConfigError(f"`{what}` is an empty string; pass a regex or a list of module names.")
        try:
            re.compile(patterns)
        except re.error as err:
            raise ConfigError(
                f"`{what}`={patterns!r} is not a valid regular expression ({err}). A single string is used "
                "as a regex on the full module name; pass a list such as ['qkv', 'proj'] to match names instead."
            ) from None
        return patterns
    if isinstance(patterns, Iterable) and not isinstance(patterns, (bytes, dict)):
        entries = tuple(patterns)
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise ConfigError(
                    f"`{what}` must hold non-empty module names (strings), got {entry!r} in {patterns!r}."
                )
        return entries
    raise ConfigError(
        f"`{what}` must be a regex string or a list of module names, got {type(patterns).__name__} {patterns!r}."
    )


def _hits(name: str, patterns: str | tuple[str, ...]) -> list[str]:
    """The patterns that select ``name`` (the regex itself, or each list entry that matches)."""
    if isinstance(patterns, str):
        return [patterns] if re.fullmatch(patterns, name) else []
    return [p for p in patterns if name == p or name.endswith("." + p)]


def match_name(name: str, include: Patterns, exclude: Patterns | None = None) -> MatchKind:
    """Apply the matching rule to one module name.

    Returns ``"excluded"`` when ``exclude`` selects the name (checked first),
    ``"match"`` when ``include`` selects it, ``"no_match"`` otherwise.

    Example:
        >>> match_name("blocks.0.attn.qkv", ["qkv", "fc1"])
        'match'
        >>> match_name("blocks.0.attn.qkv", ["qkv"], exclude=["blocks.0.attn.qkv"])
        'excluded'
        >>> match_name("blocks.0.attn.qkv2", ["qkv"])
        'no_match'
        >>> match_name("blocks.0.attn.qkv", r"blocks\\.\\d+\\.attn\\.qkv")
        'match'
    """
    inc = _normalise(include, "include")
    exc = _normalise(exclude, "exclude")
    if inc is None:
        raise ConfigError("`include` is required: a regex string or a list of module names.")
    if exc is not None and _hits(name, exc):
        return "excluded"
    return "match" if _hits(name, inc) else "no_match"


# -- a whole model ---------------------------------------------------------------
def _type_label(module_types: tuple[type, ...] | None) -> str:
    if not module_types:
        return "module"
    return " or ".join(f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__ for t in module_types)


def _walk(
    model: nn.Module,
    include: str | tuple[str, ...],
    exclude: str | tuple[str, ...] | None,
    module_types: tuple[type, ...] | None,
) -> MatchResult:
    matched: list[str] = []
    excluded: list[str] = []
    wrong_type: list[tuple[str, str]] = []
    candidates: list[str] = []
    used_include: set[str] = set()
    used_exclude: set[str] = set()
    for name, module in model.named_modules():
        if not name:  # the root module itself
            continue
        accepted = module_types is None or isinstance(module, module_types)
        if accepted:
            candidates.append(name)
        exc_hits = _hits(name, exclude) if exclude is not None else []
        used_exclude.update(exc_hits)
        inc_hits = _hits(name, include)
        if not inc_hits:
            continue
        if exc_hits:
            excluded.append(name)
            if accepted:
                used_include.update(inc_hits)
            continue
        if accepted:
            used_include.update(inc_hits)
            matched.append(name)
        else:
            wrong_type.append((name, type(module).__name__))
    inc_list = (include,) if isinstance(include, str) else include
    exc_list = () if exclude is None else ((exclude,) if isinstance(exclude, str) else exclude)
    return MatchResult(
        matched=tuple(matched),
        excluded=tuple(excluded),
        wrong_type=tuple(wrong_type),
        unmatched_patterns=tuple(p for p in dict.fromkeys(inc_list) if p not in used_include),
        unmatched_excludes=tuple(p for p in dict.fromkeys(exc_list) if p not in used_exclude),
        candidates=tuple(candidates),
    )


def _no_match_message(result: MatchResult, model: nn.Module, what: str, type_label: str, include) -> str:
    parts = [f"`{what}` selects no {type_label} in {type(model).__name__}."]
    if result.unmatched_patterns:
        shown = ", ".join(repr(p) for p in result.unmatched_patterns)
        parts.append(f"Pattern(s) that matched nothing: {shown}.")
    if isinstance(include, str):
        parts.append("A single string is a regex that must match the whole module name (re.fullmatch).")
    else:
        parts.append("A list entry matches a module named exactly so, or whose name ends with '.' + entry.")
        leaves = sorted({c.rsplit(".", 1)[-1] for c in result.candidates})
        for p in result.unmatched_patterns:
            hint = did_you_mean(p, leaves)
            if hint:
                parts.append(f"For {p!r}:{hint}")
    if result.wrong_type:
        shown = ", ".join(f"{n!r} ({t})" for n, t in result.wrong_type[:5])
        parts.append(f"These names match but are not of type {type_label}: {shown}.")
        if any(t in ("LoRALinear", "SharedLinear") for _, t in result.wrong_type):
            parts.append("Those layers are already wrapped; add another LoRA adapter with add_adapter(model, name).")
    if result.excluded:
        parts.append(f"Removed by the exclusions: {preview(result.excluded, 5)}.")
    if result.candidates:
        parts.append(
            f"Some {type_label} names that exist ({min(len(result.candidates), _MAX_CANDIDATES)} of "
            f"{len(result.candidates)}): {', '.join(repr(c) for c in result.candidates[:_MAX_CANDIDATES])}."
        )
    else:
        parts.append(f"The model has no {type_label} at all.")
    parts.append("Run cl_plugin.adapters.inspect_matches(model, include, exclude) to see what a pattern selects.")
    return " ".join(parts)


def match_modules(
    model: nn.Module,
    include: Patterns,
    exclude: Patterns | None = None,
    *,
    module_types: tuple[type, ...] | None = (nn.Linear,),
    what: str = "target_modules",
) -> MatchResult:
    """Select modules of ``model`` by name; raise if nothing is selected.

    Args:
        model: the module to walk.
        include: a regex (full match) or a list of names / dotted suffixes.
        exclude: the same kinds of patterns; checked first (default none).
        module_types: only modules of these types are selected; ``None`` accepts
            every module (default ``(nn.Linear,)``).
        what: the argument name used in messages (default ``"target_modules"``).

    Returns:
        A :class:`MatchResult` whose ``matched`` is non-empty.

    Raises:
        ConfigError: a pattern is not a string or not a valid regex.
        NoMatchingModulesError: nothing is selected; the message lists the
            patterns that matched nothing and up to 10 module names that exist.

    Warns:
        UserWarning: some list entries matched nothing while others did, or an
        exclusion matched no module name (usually a typo).
    """
    inc = _normalise(include, what)
    if inc is None or (not isinstance(inc, str) and not inc):
        raise ConfigError(f"`{what}` is required: a regex string or a non-empty list of module names, got {include!r}.")
    exc = _normalise(exclude, "exclude_modules")
    module_types = tuple(module_types) if module_types else None
    result = _walk(model, inc, exc, module_types)
    label = _type_label(module_types)
    if not result.matched:
        raise NoMatchingModulesError(_no_match_message(result, model, what, label, inc))
    if result.unmatched_patterns:
        shown = ", ".join(repr(p) for p in result.unmatched_patterns)
        warnings.warn(
            f"`{what}` entries {shown} matched no {label}; the other entries selected "
            f"{len(result.matched)} module(s). Check for a typo.",
            UserWarning,
            stacklevel=3,
        )
    if result.unmatched_excludes:
        shown = ", ".join(repr(p) for p in result.unmatched_excludes)
        warnings.warn(f"Exclusion(s) {shown} matched no module name; they have no effect.", UserWarning, stacklevel=3)
    return result


def inspect_matches(
    model: nn.Module,
    include: Patterns,
    exclude: Patterns | None = None,
    *,
    module_types: tuple[type, ...] | None = (nn.Linear,),
    print_fn=print,
) -> MatchResult:
    """Show what ``include``/``exclude`` would select, without raising or changing anything.

    Prints one line per selected, excluded or wrong-type module, then the
    patterns that matched nothing; pass ``print_fn=None`` to only get the result.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> r = inspect_matches(net, ["0", "5"], print_fn=None)
        >>> r.matched, r.unmatched_patterns
        (('0',), ('5',))
    """
    inc = _normalise(include, "include")
    if inc is None:
        raise ConfigError("`include` is required: a regex string or a list of module names.")
    exc = _normalise(exclude, "exclude")
    module_types = tuple(module_types) if module_types else None
    result = _walk(model, inc, exc, module_types)
    if print_fn is not None:
        label = _type_label(module_types)
        print_fn(f"{len(result.matched)} of {len(result.candidates)} {label}(s) selected:")
        for name in result.matched:
            print_fn(f"  + {name}")
        for name in result.excluded:
            print_fn(f"  - {name} (excluded)")
        for name, tname in result.wrong_type:
            print_fn(f"  ! {name} (name matches, but it is a {tname})")
        for p in result.unmatched_patterns:
            print_fn(f"  ? pattern {p!r} matched nothing")
        for p in result.unmatched_excludes:
            print_fn(f"  ? exclusion {p!r} matched nothing")
    return result
