"""Checkpoints written by one process and resumed, case by case, in another.

``write_runs(root)`` runs a few short streams (the pytest process) and keeps
every epoch's checkpoint plus the uninterrupted run's results. ``python
resume_cases.py ROOT OUT`` (a fresh process) resumes each case in
:data:`CASES` from those files, a new module, Trainer and callbacks each time,
and writes one outcome per case to ``OUT`` (JSON): the error class and
message, whether the weights equal the expected ones, and whether the
callback state is still the freshly constructed one after an error.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from cl_plugin.callbacks import ContinualEvaluation, LoRAAdapters, ModelMerging, SharedSubspaceAdapters

from stream_helpers import TinyClassifier, ToyStream, experience_data, trainer_kwargs

N_EXP, EPE = 3, 2
RESUME_EPOCH = 2  # written after the first epoch of experience 1
LORA = dict(target_modules=["net.0"], r=2, alpha=4.0, trainable=["net.3"])
SHARE = dict(target_modules=["net.0"], k=8, r=2, alpha=4.0, trainable=["net.3"])


class EvalStream(ToyStream):
    """ToyStream with one test loader per experience (for ContinualEvaluation)."""

    def test_dataloader(self):
        return [DataLoader(experience_data(e, n=32), batch_size=32) for e in range(self.n_experiences)]


def _float_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


# -- the runs the checkpoints come from ------------------------------------------------------------------
RUNS = {
    "mm": lambda: [ModelMerging("magmax")],
    "opcm": lambda: [ModelMerging("opcm", alpha=0.5)],
    "ce": lambda: [ModelMerging("magmax"), ContinualEvaluation(compare=["ties"])],
    "lora": lambda: [LoRAAdapters(**LORA)],
    "share": lambda: [SharedSubspaceAdapters(**SHARE)],
    "plain": lambda: [],
    "weights_only": lambda: [ModelMerging("magmax")],
}


def write_runs(root: Path) -> None:
    """One uninterrupted 3-experience run per entry of RUNS, with a checkpoint after every epoch."""
    for name, callbacks in RUNS.items():
        folder = root / name
        L.seed_everything(0, verbose=False)
        model = TinyClassifier()
        theta0 = _float_state(model)
        cbs = callbacks()
        ckpt = ModelCheckpoint(
            dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_weights_only=name == "weights_only"
        )
        trainer = L.Trainer(
            max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[*cbs, ckpt],
            default_root_dir=folder, **trainer_kwargs(enable_checkpointing=True),
        )
        trainer.fit(model, datamodule=EvalStream(N_EXP, EPE))
        result = {"final": _float_state(model), "theta0": theta0}
        merging = [cb for cb in cbs if isinstance(cb, ModelMerging)]
        if merging:
            result["merged"] = dict(merging[0].merger.merged())
        evaluation = [cb for cb in cbs if isinstance(cb, ContinualEvaluation)]
        if evaluation:
            result["results"] = {k: torch.tensor(v["accuracy_matrix"]) for k, v in evaluation[0].results.items()}
        torch.save(result, folder / "reference.pt")
        save_file(theta0, folder / "theta0.safetensors")


# -- the resume cases -------------------------------------------------------------------------------------
def _edit(root: Path, run: str, key: str, edit) -> str:
    """A copy of ``run``'s resume checkpoint with ``edit(state)`` applied to callback state ``key``."""
    checkpoint = torch.load(root / run / f"epoch={RESUME_EPOCH}.ckpt", weights_only=False)
    edit(checkpoint["callbacks"], key)
    path = root / run / f"edited-{abs(hash(edit.__code__.co_name)) % 10**8}-{key}.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def _set(path_to_value):
    """An edit that sets ``state[k1][k2]... = value``."""

    def edit(states, key):
        *keys, value = path_to_value
        target = states[key]
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value

    return edit


def _drop(name):
    def edit(states, key):
        del states[key][name]

    return edit


def _rename_to_legacy(states, key):
    states["ModelMerging{'method': 'magmax', 'start_from': 'finetuned', 'scale': 0.5}"] = states.pop(key)


def _nan_first(tensors):
    first = next(iter(tensors))
    tensors = dict(tensors)
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    return tensors


def _reshape_first(tensors):
    first = next(iter(tensors))
    tensors = dict(tensors)
    tensors[first] = torch.zeros(3, 3)
    return tensors


def _half(tensors):
    return {n: t.half() for n, t in tensors.items()}


def _nan_merger(state):
    state = dict(state)
    key = next(k for k in state if k.startswith("merged."))
    state[key] = torch.full_like(state[key], float("nan"))
    return state


# name -> (run, callbacks factory, checkpoint: None = the run's resume checkpoint, or (key, edit))
CASES = {
    "mm_same": ("mm", lambda: [ModelMerging("magmax")], None),
    "mm_scale": ("mm", lambda: [ModelMerging("magmax", scale=0.7)], None),
    "mm_method": ("mm", lambda: [ModelMerging("average")], None),
    "mm_start_from": ("mm", lambda: [ModelMerging("magmax", start_from="pretrained")], None),
    "mm_exclude": ("mm", lambda: [ModelMerging("magmax", exclude=["net.3.*"])], None),
    "mm_legacy_key": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _rename_to_legacy)),
    "mm_format_version": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["format_version", 99]))),
    "mm_finished_string": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["experiences_finished", "two"]))),
    "mm_finished_wrong": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["experiences_finished", 2]))),
    "mm_missing_merger": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _drop("merger"))),
    "mm_missing_theta0": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _drop("theta0"))),
    "mm_theta0_none": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["theta0", None]))),
    "mm_num_tasks_negative": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["merger", "num_tasks", -1]))),
    "mm_merger_nan": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["merger", _nan_merger]))),
    "mm_theta0_nan": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["theta0", _nan_first]))),
    "mm_theta0_shape": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["theta0", _reshape_first]))),
    "mm_theta0_dtype": ("mm", lambda: [ModelMerging("magmax")], ("ModelMerging", _set(["theta0", _half]))),
    "opcm_alpha": ("opcm", lambda: [ModelMerging("opcm", alpha=0.3)], None),
    "plain_into_merging": ("plain", lambda: [ModelMerging("magmax")], None),
    "plain_with_base_weights": ("plain", lambda folder: [ModelMerging("magmax", base_weights=folder / "theta0.safetensors")], None),
    "weights_only": ("weights_only", lambda: [ModelMerging("magmax")], None),
    "ce_same": ("ce", lambda: [ModelMerging("magmax"), ContinualEvaluation(compare=["ties"])], None),
    "ce_compare_added": ("ce", lambda: [ModelMerging("magmax"), ContinualEvaluation(compare=["ties", "average"])], None),
    "ce_options": ("ce", lambda: [ModelMerging("magmax"), ContinualEvaluation(compare=["ties"], method_options={"ties": {"top_k": 0.5}})], None),
    "ce_scales": ("ce", lambda: [ModelMerging("magmax"), ContinualEvaluation(compare=["ties"], scales={"ties": 0.3})], None),
    "lora_same": ("lora", lambda: [LoRAAdapters(**LORA)], None),
    "lora_method": ("lora", lambda: [LoRAAdapters(**LORA, method="average")], None),
    "lora_start_from": ("lora", lambda: [LoRAAdapters(**LORA, start_from="finetuned")], None),
    "lora_scale": ("lora", lambda: [LoRAAdapters(**LORA, scale=0.9)], None),
    "share_same": ("share", lambda: [SharedSubspaceAdapters(**SHARE)], None),
    "share_k": ("share", lambda: [SharedSubspaceAdapters(**{**SHARE, "k": 6})], None),
}


def _fresh_state(callback) -> bool:
    """True when the callback holds nothing from a checkpoint (what a constructor leaves)."""
    if callback._experiences_finished or callback._training_experience is not None:
        return False
    merger = getattr(callback, "merger", None)
    if merger is not None and merger.num_tasks:
        return False
    if isinstance(callback, ModelMerging) and callback.base_weights is not None and callback._base_weights_source is None:
        return False
    return True


def run_case(root: Path, name: str) -> dict:
    run, factory, edit = CASES[name]
    ckpt = str(root / run / f"epoch={RESUME_EPOCH}.ckpt") if edit is None else _edit(root, run, *edit)
    reference = torch.load(root / run / "reference.pt", weights_only=True)
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    callbacks = factory(root / run) if factory.__code__.co_argcount else factory()
    folder = root / "resumed" / name
    trainer = L.Trainer(
        max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=callbacks, default_root_dir=folder,
        **trainer_kwargs(),
    )
    outcome: dict = {"error": None, "message": ""}
    try:
        trainer.fit(model, datamodule=EvalStream(N_EXP, EPE), ckpt_path=ckpt)
    except Exception as exc:  # noqa: BLE001 - each case reports what was raised
        outcome.update(error=type(exc).__name__, message=str(exc), fresh=[_fresh_state(cb) for cb in callbacks])
        return outcome
    final = _float_state(model)
    outcome["same_as_reference"] = all(torch.equal(final[n], reference["final"][n]) for n in reference["final"])
    merging = [cb for cb in callbacks if isinstance(cb, ModelMerging)]
    if merging:
        cb = merging[0]
        outcome["num_tasks"] = cb.merger.num_tasks
        if "merged" in reference:
            expected = {n: reference["theta0"][n] + cb.scale * t for n, t in reference["merged"].items()}
            outcome["equals_theta0_plus_scale_merged"] = all(
                torch.allclose(final[n], expected[n], rtol=0, atol=1e-6) for n in expected
            )
    for cb in callbacks:
        if isinstance(cb, LoRAAdapters) or isinstance(cb, SharedSubspaceAdapters):
            outcome["experiences_finished"] = cb._experiences_finished
        if isinstance(cb, ContinualEvaluation):
            outcome["results_same"] = all(
                torch.equal(torch.tensor(cb.results[k]["accuracy_matrix"]), v) for k, v in reference["results"].items()
            )
    return outcome


if __name__ == "__main__":
    torch.set_num_threads(1)
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    names = sys.argv[3:] or list(CASES)
    outcomes = {}
    for case in names:
        try:
            outcomes[case] = run_case(root, case)
        except Exception:  # noqa: BLE001 - a broken harness must show, not hide the other cases
            outcomes[case] = {"error": "HarnessError", "message": traceback.format_exc()}
    out.write_text(json.dumps(outcomes, indent=1))
