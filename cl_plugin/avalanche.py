"""Avalanche: continual model merging as a plugin for Avalanche 0.6's own strategies.

:class:`MergingPlugin` is a ``SupervisedPlugin`` over the boundary core
:class:`~cl_plugin.merging.continual.ContinualMerge`, the one the Lightning
callback ``ModelMerging`` uses, so the rules are the same: which tensors are
merged, how normalisation statistics are averaged, all-or-nothing folds.

* ``before_training_exp`` of the first experience (after Avalanche's model
  adaptation, before any step) takes θ₀; every experience start checks that
  the merged tensors are still there with their shapes and writes the weights
  the experience trains from, as ``start_from`` says.
* ``after_training_exp`` folds τ = θ − θ₀ and writes θ₀ + λ·merged into
  ``strategy.model`` in place: every later ``strategy.eval`` (Avalanche's
  periodic evaluation after the experience, the user's own calls, the model
  ``train`` hands back) sees the merged model.
* :meth:`MergingPlugin.save` / :meth:`MergingPlugin.load` keep the plugin's
  state in one safetensors file (tensors) with JSON metadata (everything
  else); nothing is unpickled. Avalanche's own ``save_checkpoint`` pickles the
  whole strategy, which fails on this stack (docs/avalanche.md).

No Lightning import.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from avalanche.benchmarks import OnlineCLExperience
from avalanche.core import SupervisedPlugin
from avalanche.models import DynamicModule
from torch import Tensor, nn

from cl_plugin._checkpoint import check_format_version, check_tensor_dict, layout_of
from cl_plugin._checks import check_same_layout, check_scale, is_finite
from cl_plugin._io import atomic_output, logger
from cl_plugin.errors import (
    CheckpointError,
    ConfigError,
    DivergedError,
    NonFiniteError,
    StateDictMismatchError,
    did_you_mean,
    preview,
)
from cl_plugin.merging.continual import ContinualMerge, check_exclude, merge_method_options, snapshot, write_into

__all__ = ["MergingPlugin", "START_FROM"]

#: Where each experience after the first starts training (see :class:`MergingPlugin`).
START_FROM = ("finetuned", "pretrained", "merged")

_OWNER = "MergingPlugin"
#: The ``format`` entry of the metadata of a file written by :meth:`MergingPlugin.save`.
_FILE_FORMAT = "cl_plugin.avalanche.MergingPlugin"
#: Marks a tensor's place in the JSON metadata of a saved file.
_TENSOR = "__tensor__"
#: The options a saved state records; all but ``scale`` must match on load.
_FIXED_OPTIONS = ("method", "method_options", "start_from", "exclude", "statistics")


class MergingPlugin(SupervisedPlugin):
    """Merge task vectors at the end of every training experience of an Avalanche strategy.

    Add it to the strategy you already have::

        plugin = MergingPlugin(method="magmax")
        strategy = Naive(model=model, optimizer=optimizer, criterion=criterion, plugins=[plugin])
        for experience in benchmark.train_stream:
            strategy.train(experience)

    After each training experience ``strategy.model`` holds θ₀ + λ·merged of
    the experiences trained so far, so ``strategy.eval(...)`` and the
    ``EvaluationPlugin``'s eval-phase metrics measure the merged model; the
    next ``strategy.train`` puts back the weights ``start_from`` names before
    its first step. Evaluations *inside* an experience (``eval_every > 0``)
    and train-phase metrics measure the weights being trained.

    Args:
        method: a name in :data:`cl_plugin.merging.MERGERS` (default ``"magmax"``).
        scale: λ in θ₀ + λ·merged, in (0, 10]; ``None`` (default) is the
            method's own default (MagMax 0.5, OPCM 1.0, ...). May be changed
            between experiences (:attr:`scale`) and when loading a state.
        start_from: the weights each experience after the first trains from:
            ``"finetuned"`` (default: the weights the previous experience ended
            with, sequential fine-tuning), ``"pretrained"`` (θ₀: independent
            fine-tuning) or ``"merged"`` (θ₀ + λ·merged).
        exclude: glob patterns of state-dict names that are not merged (e.g.
            ``("classifier.*",)`` for the heads a ``MultiHeadClassifier``
            adds); they keep the values training gives them.
        statistics: how BatchNorm running statistics are merged:
            ``"average"`` (default, always valid) or ``"merge"`` (with the method).
        method_options: the merger's options as one mapping, e.g. ``{"alpha": 0.5}`` for OPCM.
        **more_options: more merger options as keywords (``top_k=0.2`` for TIES, ...).

    Raises:
        ConfigError: an unknown method, option, ``start_from`` or
            ``statistics``, a ``scale`` out of range, a bad ``exclude``; during
            training: a second ``MergingPlugin`` in the strategy, an online
            stream, merged tensors added or removed since θ₀ (Avalanche's
            dynamic modules: pass ``exclude=``); when loading: a state written
            with another ``method``, ``method_options``, ``start_from``,
            ``exclude`` or ``statistics`` (each is named).
        StateDictMismatchError: a merged tensor changed shape or dtype since θ₀
            (e.g. an ``IncrementalClassifier`` that grew).
        CheckpointError: a damaged or foreign state or file.
        NonFiniteError: θ₀ holds NaN/inf; the weights diverged during an
            experience (nothing is folded; the model holds the merge of the
            experiences before it, or θ₀).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from avalanche.training.supervised import Naive
        >>> from cl_plugin.benchmarks import split_digits
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> plugin = MergingPlugin("magmax")
        >>> strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        ...                  criterion=nn.CrossEntropyLoss(), train_mb_size=64, plugins=[plugin],
        ...                  evaluator=None)  # no printed progress
        >>> for experience in split_digits(n_experiences=2).train_stream:
        ...     _ = strategy.train(experience)
        >>> plugin
        MergingPlugin(method='magmax', scale=0.5, start_from='finetuned', num_tasks=2)
        >>> merged = plugin.core.merged_tensors()
        >>> all(torch.equal(model.state_dict()[n], t) for n, t in merged.items())
        True
    """

    #: The version of :meth:`state_dict`'s layout this class writes and reads.
    state_format_version = 1

    def __init__(
        self,
        method: str = "magmax",
        scale: float | None = None,
        start_from: str = "finetuned",
        exclude: Iterable[str] = (),
        statistics: str = "average",
        method_options: Mapping[str, Any] | None = None,
        **more_options: Any,
    ) -> None:
        super().__init__()
        options = merge_method_options(method_options, more_options, _OWNER)
        exclude = check_exclude(exclude, _OWNER)
        if start_from not in START_FROM:
            raise ConfigError(
                f"`start_from` must be one of {list(START_FROM)}, got {start_from!r} ({_OWNER})."
                + did_you_mean(str(start_from), START_FROM)
            )
        # Checks method, options, scale and statistics before anything is stored.
        self.core = ContinualMerge(method, scale=scale, exclude=exclude, statistics=statistics, method_options=options)
        self.method = method
        self.start_from = start_from
        self.exclude = exclude
        self.statistics = statistics
        # start_from="finetuned": the weights the last folded experience ended with, which the
        # next experience continues from (the model holds the merge in between).
        self._kept_weights: dict[str, Tensor] | None = None
        self._folded_experiences: list[int | None] = []
        self._in_experience = False
        self._experience: int | None = None
        # True while the optimizer's state belongs to the kept weights: the last experience
        # ended with a fold in this plugin, and nothing has been trained or loaded since.
        self._continues = False
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._warned_periodic_eval = False

    # -- public helpers ---------------------------------------------------------------------------
    @property
    def merger(self):
        """The streaming merger; ``merger.num_tasks`` experiences are folded."""
        return self.core.merger

    @property
    def scale(self) -> float:
        """λ in θ₀ + λ·merged; a new value applies from the next write of the merged weights."""
        return self.core.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.core.scale = check_scale(value, f"{_OWNER}(method={self.method!r})")

    @property
    def base_weights(self) -> dict[str, Tensor] | None:
        """θ₀ over the merged tensors (on CPU), once the first experience has started."""
        return self.core.theta0

    def apply_merged(self, model: nn.Module) -> None:
        """Write θ₀ + λ·merged into ``model``'s merged tensors, in place (e.g. after loading with another ``scale``).

        Raises:
            ConfigError: no experience has been folded yet.
            StateDictMismatchError: ``model`` lacks a merged tensor or has another shape.
        """
        merged = self.core.merged_tensors()
        check_same_layout(
            {n: (tuple(t.shape), t.dtype) for n, t in merged.items()},
            {n: t for n, t in model.state_dict().items() if n in merged},
            f"{_OWNER}.apply_merged: the model against the merge",
        )
        write_into(model, merged)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, scale={self.scale}, start_from={self.start_from!r}, "
            f"num_tasks={self.merger.num_tasks})"
        )

    # -- Avalanche hooks ----------------------------------------------------------------------------
    def before_training(self, strategy, *args, **kwargs) -> None:
        same = [p for p in getattr(strategy, "plugins", ()) if isinstance(p, MergingPlugin)]
        if len(same) > 1:
            raise ConfigError(
                f"The strategy has {len(same)} MergingPlugins ({[p.method for p in same]}); each would fold the "
                "weights the other wrote as if they were fine-tuned ones. Keep one per strategy."
            )
        every = getattr(strategy, "eval_every", -1)
        if isinstance(every, int) and every > 0 and not self._warned_periodic_eval:
            self._warned_periodic_eval = True
            warnings.warn(
                f"{_OWNER}: the strategy evaluates inside each training experience (eval_every={every}): those "
                "evaluations see the weights being trained, not the merge, which is written only when the "
                "experience ends. For the merged model's accuracy after every experience use eval_every=0, or "
                "call strategy.eval(...) after strategy.train(...).",
                stacklevel=2,
            )

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        experience = strategy.experience
        if isinstance(experience, OnlineCLExperience):
            raise ConfigError(
                f"{_OWNER} does not run on online streams: each mini-experience would be folded as a task of its "
                "own. Train the strategy on the benchmark's task experiences (e.g. Naive on "
                "benchmark.train_stream)."
            )
        index = _experience_index(experience)
        model = strategy.model
        self._bind(model, f"at the start of experience {index}")
        if self.core.theta0 is None:
            self.core.capture_theta0(model, f"{_OWNER}: θ₀ (the weights when the first experience starts)")
        else:
            self._check_layout(model, f"at the start of experience {index}")
            self._install_start_weights(strategy, self._continues)
        self._continues = False
        if index is not None and index in self._folded_experiences:
            warnings.warn(
                f"{_OWNER}: experience {index} was folded already; training it again folds a second task vector "
                "for it. If you resumed a stream, continue with the first experience not yet trained.",
                stacklevel=2,
            )
        self._in_experience = True
        self._experience = index

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        model = strategy.model
        index = self._experience
        self._in_experience = False
        self._bind(model, f"during experience {index}")
        self._check_layout(model, f"at the end of experience {index}")
        kept = snapshot(model, self.core.all_names) if self.start_from == "finetuned" else None
        try:
            if self.core.folds_in_place:  # τ formed chunk by chunk inside the fold
                self.core.fold_in_place(model)
            else:
                self.core.fold(model)
        except DivergedError:
            self._diverged(strategy, index)
        self._kept_weights = kept
        self._folded_experiences.append(index)
        self._continues = True
        write_into(model, self.core.merged_tensors())

    # -- internals ---------------------------------------------------------------------------------
    def _bind(self, model: nn.Module, when: str) -> None:
        """Bind the core to ``model``; raise, naming Avalanche's dynamic modules, if the merged tensors changed."""
        names, statistic_names, _, _ = self.core.select(model)
        if self.core.names is not None and (names, statistic_names) != (self.core.names, self.core.statistic_names):
            before, now = self.core.all_names, names + statistic_names
            added = [n for n in now if n not in before]
            removed = [n for n in before if n not in now]
            raise ConfigError(
                f"{_OWNER}: the model's merged tensors changed {when} (added {preview(added, 3) or 'none'}; "
                f"removed {preview(removed, 3) or 'none'}), and a task vector needs the tensors θ₀ holds. "
                + _dynamic_hint(model, added or removed, self.exclude)
            )
        self.core.bind(model)
        state = model.state_dict()
        self._layout = layout_of({n: state[n] for n in self.core.all_names})

    def _check_layout(self, model: nn.Module, when: str) -> None:
        """Raise unless the model's merged tensors have θ₀'s shapes and dtypes (and the kept weights')."""
        state = model.state_dict()
        theta0 = self.core.theta0
        changed = [n for n in theta0 if tuple(state[n].shape) != tuple(theta0[n].shape)]
        if changed:
            shapes = "; ".join(f"{n!r}: {tuple(theta0[n].shape)} -> {tuple(state[n].shape)}" for n in changed[:3])
            raise StateDictMismatchError(
                f"{_OWNER}: {len(changed)} merged tensor(s) changed shape {when} ({shapes}). "
                + _dynamic_hint(model, changed, self.exclude)
            )
        current = {n: state[n] for n in theta0}
        check_same_layout(theta0, current, f"{_OWNER}: the model {when} against θ₀")
        if self._kept_weights is not None:
            check_same_layout(self._kept_weights, current, f"{_OWNER}: the model {when} against the kept weights")

    def _install_start_weights(self, strategy, continues: bool) -> None:
        """Write the weights this experience trains from; clear the optimizer's state unless training simply continues."""
        model = strategy.model
        if not self.merger.num_tasks:
            start, continues = self.core.theta0, False  # a retry of the first experience, or a loaded θ₀
        elif self.start_from == "finetuned":
            if self._kept_weights is None:
                raise CheckpointError(
                    f"{_OWNER}(start_from='finetuned') has folded {self.merger.num_tasks} experience(s) but holds no "
                    "fine-tuned weights to continue from; its state is damaged. Load a state written by save()."
                )
            # The optimizer's state belongs to these weights, unless an attempt failed or a state was loaded since.
            start = self._kept_weights
        elif self.start_from == "pretrained":
            start, continues = self.core.theta0, False
        else:
            start, continues = self.core.merged_tensors(), False
        write_into(model, start)
        if not continues:
            _reset_optimizer_state(strategy)

    def _diverged(self, strategy, index: int | None) -> None:
        """The weights after experience ``index`` are not finite: put the model back as it was, then raise."""
        model = strategy.model
        state = model.state_dict()
        bad = [n for n in self.core.all_names if not is_finite(state[n])]
        folded = self.merger.num_tasks
        if folded:
            write_into(model, self.core.merged_tensors())
            restored = f"θ₀ + {self.scale}·merged of the {folded} experience(s) folded before"
        else:
            write_into(model, self.core.theta0)
            restored = "θ₀"
        _reset_optimizer_state(strategy)  # its momentum holds NaN as well
        raise NonFiniteError(
            f"{_OWNER}: training diverged in experience {index}: the weights hold NaN or infinite values in "
            f"{len(bad)} tensor(s) ({preview(bad, 3)}), so there is no task vector to fold. The merge is unchanged "
            f"({folded} experience(s) folded), the model holds {restored} again and the optimizer's state is "
            "cleared. Call strategy.train(experience) again after changing what made it diverge (a lower learning "
            "rate, gradient clipping): it starts from the same weights as the failed attempt."
        ) from None

    # -- checkpointing ------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_options": _plain(self.merger.options()),
            "start_from": self.start_from,
            "exclude": list(self.exclude),
            "statistics": self.statistics,
            "scale": self.scale,
        }

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state between experiences: a flat dict of plain values and tensors.

        Keys: ``format_version``; the options ``method``, ``method_options``,
        ``start_from``, ``exclude``, ``statistics``, ``scale``; the core's
        ``names``, ``statistic_names``, ``theta0`` (name -> tensor),
        ``merger`` and ``statistics_merger`` (the mergers' states);
        ``kept_weights`` (name -> tensor, ``start_from="finetuned"`` once an
        experience is folded, else None) and ``folded_experiences`` (the
        index of each folded experience). The tensors are the live ones, not
        copies. The model's own weights are not in it: save them yourself.

        Raises:
            ConfigError: called while an experience trains (a state is only
                defined between experiences).
        """
        if self._in_experience:
            raise ConfigError(
                f"{_OWNER}: experience {self._experience} is training; its state can be saved only between "
                "experiences (after strategy.train(...) returns, or in after_training_exp of a plugin placed after "
                "this one)."
            )
        state: dict[str, Any] = {"format_version": self.state_format_version, **self._options()}
        state.update(self.core.state_dict())
        state["kept_weights"] = self._kept_weights
        state["folded_experiences"] = list(self._folded_experiences)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream a :meth:`state_dict` describes; the state is checked completely first.

        ``scale`` may differ from the saved one (this plugin's applies); every
        other option must match.

        Raises:
            ConfigError: the state was written with another ``method``,
                ``method_options``, ``start_from``, ``exclude`` or ``statistics``
                (each difference is named).
            CheckpointError: the state is damaged, of a newer format, or does
                not fit the model this plugin is bound to.
        """
        self._prepare_load(state)()

    def _prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        if self._in_experience:
            raise ConfigError(
                f"{_OWNER}: experience {self._experience} is training; load a state between experiences "
                "(before strategy.train(...))."
            )
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{_OWNER}.load_state_dict expects a mapping, got {type(state).__name__}.")
        check_format_version(state, _OWNER, self.state_format_version)
        self._check_options(state)
        apply_core = self.core.prepare_load(state, _OWNER, layout=self._layout)
        merger_state = state["merger"] or {}
        folded = int(merger_state.get("num_tasks", 0))
        names = list(state["names"] or []) + list(state.get("statistic_names", []))
        kept = state.get("kept_weights")
        if self.start_from == "finetuned" and folded:
            if kept is None:
                raise CheckpointError(
                    f"The {_OWNER} state (start_from='finetuned', {folded} experience(s) folded) lacks the "
                    "fine-tuned weights the next experience continues from (`kept_weights`); it is damaged."
                )
            kept = check_tensor_dict(kept, "kept_weights", _OWNER, self._layout, names=names, device=self.core.device)
        elif kept is not None:
            raise CheckpointError(
                f"The {_OWNER} state holds `kept_weights` with start_from={self.start_from!r} and {folded} "
                "experience(s) folded; only start_from='finetuned' keeps them once an experience is folded. It is damaged."
            )
        experiences = state.get("folded_experiences", [None] * folded)
        if (
            not isinstance(experiences, (list, tuple))
            or len(experiences) != folded
            or not all(e is None or (isinstance(e, int) and not isinstance(e, bool) and e >= 0) for e in experiences)
        ):
            raise CheckpointError(
                f"The {_OWNER} state has folded_experiences={experiences!r}; expected {folded} experience "
                "index(es) (integers >= 0 or None), one per folded experience. It is damaged."
            )

        def apply() -> None:
            apply_core()
            self._kept_weights = kept
            self._folded_experiences = list(experiences)
            self._in_experience = False
            self._experience = None
            self._continues = False

        return apply

    def _check_options(self, state: Mapping[str, Any]) -> None:
        mine = self._options()
        missing = [k for k in _FIXED_OPTIONS if k not in state]
        if missing:
            raise CheckpointError(
                f"The {_OWNER} state lacks the option(s) {missing}; it is damaged or was not written by "
                f"{_OWNER}.state_dict()."
            )
        differ = [
            f"`{k}`: saved {state[k]!r}, here {mine[k]!r}" for k in _FIXED_OPTIONS if _plain(state[k]) != _plain(mine[k])
        ]
        if differ:
            saved = ", ".join(f"{k}={state[k]!r}" for k in _FIXED_OPTIONS if k != "method_options")
            raise ConfigError(
                f"The {_OWNER} state was written with other options, and continuing it would mix two streams: "
                + "; ".join(differ)
                + f". Create the plugin with the saved values ({saved}, method_options={state['method_options']!r}) "
                "to continue that stream, or start a new one without loading. (`scale` may differ.)"
            )
        saved_scale = state.get("scale")
        if saved_scale is not None and saved_scale != self.scale:
            logger.info("%s: the state was saved with scale=%r; this plugin merges with scale=%r.", _OWNER, saved_scale, self.scale)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path``: a safetensors file, the plain values as JSON in its metadata.

        The file is written beside ``path`` and renamed over it when complete.
        Save the model's weights (and, if you need them, the optimizer's) yourself.

        Raises:
            ConfigError: called while an experience trains.
        """
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        plain = _split_tensors(self.state_dict(), (), tensors)
        metadata = {
            "format": _FILE_FORMAT,
            "format_version": str(self.state_format_version),
            "state": json.dumps(plain, sort_keys=True),
        }
        with atomic_output(path) as tmp:
            save_file(tensors, os.fspath(tmp), metadata=metadata)

    def load(self, path: str | os.PathLike) -> None:
        """Read a file written by :meth:`save` and :meth:`load_state_dict` it (never unpickles).

        Raises:
            ConfigError: the file does not exist, or its options differ (see :meth:`load_state_dict`).
            CheckpointError: not a safetensors file written by :meth:`save`, or damaged.
        """
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"{_OWNER}.load: {path!r} does not exist or is not a file.")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{_OWNER}.load: {path!r} is not a safetensors file ({exc}). It reads only files written by "
                f"{_OWNER}.save (it never unpickles)."
            ) from None
        if metadata.get("format") != _FILE_FORMAT:
            raise CheckpointError(
                f"{_OWNER}.load: {path!r} was not written by {_OWNER}.save (metadata format "
                f"{metadata.get('format')!r}, expected {_FILE_FORMAT!r})."
            )
        if metadata.get("format_version") != str(self.state_format_version):
            raise CheckpointError(
                f"{_OWNER}.load: {path!r} has format_version {metadata.get('format_version')!r}; this cl-plugin "
                f"reads {self.state_format_version}. Upgrade cl-plugin to load it."
            )
        try:
            plain = json.loads(metadata["state"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{_OWNER}.load: {path!r} has no readable `state` metadata ({exc}); it is damaged.") from None
        used: set[str] = set()
        state = _join_tensors(plain, tensors, used, path)
        unused = sorted(set(tensors) - used)
        if unused:
            raise CheckpointError(f"{_OWNER}.load: {path!r} holds tensors its metadata does not place ({preview(unused)}); it is damaged.")
        self.load_state_dict(state)


# -- helpers ------------------------------------------------------------------------------------------
def _experience_index(experience: object) -> int | None:
    index = getattr(experience, "current_experience", None)
    return int(index) if isinstance(index, int) else None


def _reset_optimizer_state(strategy) -> None:
    """Drop the optimizer's per-parameter state (momentum, Adam moments); its parameter groups stay."""
    optimizer = getattr(strategy, "optimizer", None)
    if optimizer is not None:
        optimizer.state.clear()


def _dynamic_hint(model: nn.Module, names: list[str], exclude: tuple[str, ...]) -> str:
    """What to do when merged tensors changed: exclude the dynamic modules they belong to, if any."""
    dynamic = [n for n, m in model.named_modules() if n and isinstance(m, DynamicModule)]
    owners = set()
    for n in names:
        covering = [d for d in dynamic if n.startswith(d + ".")]
        if covering:
            owners.add(min(covering, key=len))  # the outermost dynamic module holding the tensor
    owners = sorted(owners)
    if not owners:
        return (
            "Task vectors need one architecture for the whole stream: create every parameter and buffer before "
            "training, and keep them."
        )
    suggested = tuple(dict.fromkeys([*exclude, *(f"{o}.*" for o in owners)]))
    kinds = sorted({type(model.get_submodule(o)).__name__ for o in owners})
    return (
        f"Avalanche's dynamic modules ({', '.join(kinds)} at {preview(owners, 3)}) change their parameters at "
        f"model adaptation (a new head per task, a wider output layer for new classes). Leave them out of the merge "
        f"with exclude={suggested!r}: each then keeps the values its own training gives it. Or create them at "
        "their final size before training (e.g. call avalanche.models.avalanche_model_adaptation(model, exp) for "
        "every experience of the stream first), so θ₀ holds them."
    )


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), to compare saved options with current ones."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return value


def _split_tensors(value: Any, path: tuple[str, ...], tensors: dict[str, Tensor]) -> Any:
    """``value`` with every tensor replaced by ``{"__tensor__": key}``; the tensors go into ``tensors`` under ``key``."""
    if isinstance(value, Tensor):
        key = ".".join(path)
        while key in tensors:
            key += "_"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(value, Mapping):
        return {str(k): _split_tensors(v, (*path, str(k)), tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: Mapping[str, Tensor], used: set[str], path: str) -> Any:
    """Undo :func:`_split_tensors`."""
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            key = value[_TENSOR]
            if key not in tensors:
                raise CheckpointError(f"{_OWNER}.load: {path!r} lacks the tensor {key!r} its metadata names; it is damaged.")
            used.add(key)
            return tensors[key]
        return {k: _join_tensors(v, tensors, used, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors, used, path) for v in value]
    return value
