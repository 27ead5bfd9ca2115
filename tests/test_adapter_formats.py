"""Adapter checkpoints written before the adapters were rebuilt (state format 1) still resume, or are refused clearly.

``tests/adapter_fixtures/`` holds Lightning checkpoints that cl-plugin wrote at
commit 87a3460 (``make_v1.py`` there, the stream of ``test_adapter_callbacks.py``
crashed in the middle of experience 1) and the final module state of each
uninterrupted run. Resumed with today's code, each run must end bit-identical
to that final state: the algorithms did not change, only where their state lives.
"""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from cl_plugin.callbacks.adapters import LoRAAdapters, SharedSubspaceAdapters
from cl_plugin.errors import CheckpointError, ConfigError

from stream_helpers import TinyClassifier, ToyStream, trainer_kwargs

FIXTURES = Path(__file__).with_name("adapter_fixtures")
N_EXP, EPE = 3, 2
LORA = dict(target_modules=["net.0"], r=2, alpha=4.0, trainable=["net.3"])
SHARE = dict(target_modules=["net.0"], k=8, r=2, alpha=4.0, trainable=["net.3"], temporary_directions=1)
CASES = {
    "lora_merge": lambda: LoRAAdapters(**LORA),  # the checkpoint recorded start_from="fresh"
    "lora_merge_finetuned": lambda: LoRAAdapters(**LORA, start_from="finetuned"),
    "lora_per_task": lambda: LoRAAdapters(**LORA, mode="per_task", trainable_per_task=True),
    "share": lambda: SharedSubspaceAdapters(**SHARE),
}


def resume(case: str, callback) -> TinyClassifier:
    L.seed_everything(123, verbose=False)
    model = TinyClassifier()
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[callback], **trainer_kwargs())
    trainer.fit(model, datamodule=ToyStream(N_EXP, EPE), ckpt_path=str(FIXTURES / f"{case}.ckpt"))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_a_format_1_checkpoint_resumes_to_the_old_codes_final_weights(case):
    checkpoint = torch.load(FIXTURES / f"{case}.ckpt", weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k in ("LoRAAdapters", "SharedSubspaceAdapters"))
    assert state["format_version"] == 1
    model = resume(case, CASES[case]())
    expected = load_file(str(FIXTURES / f"{case}_final.safetensors"))
    final = model.state_dict()
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


def test_the_deprecated_start_from_name_warns_and_resumes_the_same():
    with pytest.warns(FutureWarning, match=r"start_from='fresh'\) is deprecated: it is start_from='pretrained'"):
        callback = LoRAAdapters(**LORA, start_from="fresh")
    assert callback.start_from == "pretrained"
    model = resume("lora_merge", callback)
    expected = load_file(str(FIXTURES / "lora_merge_final.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_a_format_1_share_state_loaded_by_hand_needs_the_module_it_belongs_to():
    checkpoint = torch.load(FIXTURES / "share.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["SharedSubspaceAdapters"]
    assert any(isinstance(v, torch.Tensor) for v in state["share"].values())  # format 1 held Share's tensors twice
    dm = ToyStream(N_EXP, EPE)
    dm.set_experience(1)
    # Into a new module: it has none of the layers the state speaks of.
    callback = SharedSubspaceAdapters(**SHARE)
    callback.load_state_dict(state)  # the bookkeeping is read; the tensors are the module's
    with pytest.raises(ConfigError, match=r"the module has no adapter layers.*Pass the same module to every `fit`"):
        L.Trainer(max_epochs=1, callbacks=[callback], **trainer_kwargs()).fit(TinyClassifier(), datamodule=dm)
    # Into a module of this callback that is still in its LoRA phase: Share's tensors are not in it.
    callback = SharedSubspaceAdapters(**SHARE)
    model = TinyClassifier(skip_experience=0)
    first = ToyStream(N_EXP, EPE)
    first.set_experience(0)
    with pytest.warns(UserWarning, match="ended before any optimizer step"):
        L.Trainer(max_epochs=1, callbacks=[callback], **trainer_kwargs()).fit(model, datamodule=first)
    assert callback.share is None
    callback.load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"records Share tasks \['0'\].*no Share layer at 'net.0'.*ckpt_path"):
        L.Trainer(max_epochs=1, callbacks=[callback], **trainer_kwargs()).fit(model, datamodule=dm)


def test_a_checkpoint_holds_shares_tensors_once():
    """Format 2: the callback state carries Share's bookkeeping, the module state its tensors."""
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    callback = SharedSubspaceAdapters(**SHARE)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[callback], **trainer_kwargs())
    trainer.fit(model, datamodule=ToyStream(N_EXP, EPE))
    state = callback.state_dict()
    assert state["format_version"] == 2
    assert state["share"] == {"tasks": ["0", "1", "2"], "training_task": None, "updates": 2, "p": 2}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    old = torch.load(FIXTURES / "share.ckpt", weights_only=False)["callbacks"]["SharedSubspaceAdapters"]
    old_buffer = io.BytesIO()
    torch.save(old, old_buffer)
    assert buffer.getbuffer().nbytes < old_buffer.getbuffer().nbytes / 2
    assert any(k.startswith("net.0.coef_a.") for k in model.state_dict())
