"""Writes the format_version 1 adapter checkpoints of this folder (run once, at commit 87a3460).

Each case runs the stream of ``tests/test_adapter_callbacks.py`` (TinyClassifier,
ToyStream with 3 experiences of 2 epochs, one ``fit``), crashes at step 13 (in
the middle of experience 1, after one boundary) and keeps the checkpoint of
the epoch before the crash (``<case>.ckpt``); the uninterrupted run's final
module state is ``<case>_final.safetensors``. ``tests/test_adapter_formats.py``
resumes each checkpoint with the current code and compares the end with it.
Run from the repository root: ``.venv/bin/python tests/adapter_fixtures/make_v1.py``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from stream_helpers import TinyClassifier, ToyStream, trainer_kwargs  # noqa: E402

from cl_plugin.callbacks.adapters import LoRAAdapters, SharedSubspaceAdapters  # noqa: E402

N_EXP, EPE, CRASH = 3, 2, 13
LORA = dict(target_modules=["net.0"], r=2, alpha=4.0, trainable=["net.3"])
CASES = {
    "lora_merge": lambda: LoRAAdapters(**LORA),  # start_from="fresh", the default then
    "lora_merge_finetuned": lambda: LoRAAdapters(**LORA, start_from="finetuned"),
    "lora_per_task": lambda: LoRAAdapters(**LORA, mode="per_task", trainable_per_task=True),
    "share": lambda: SharedSubspaceAdapters(target_modules=["net.0"], k=8, r=2, alpha=4.0, trainable=["net.3"], temporary_directions=1),
}


def main() -> None:
    for name, make in CASES.items():
        L.seed_everything(0, verbose=False)
        model = TinyClassifier()
        L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[make()], **trainer_kwargs()).fit(
            model, datamodule=ToyStream(N_EXP, EPE)
        )
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(HERE / f"{name}_final.safetensors"))
        with tempfile.TemporaryDirectory() as tmp:
            L.seed_everything(0, verbose=False)
            crashing = TinyClassifier(crash_at_step=CRASH)
            ckpt = ModelCheckpoint(dirpath=tmp, save_last=True, every_n_epochs=1)
            trainer = L.Trainer(
                max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[make(), ckpt],
                **trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp),
            )
            try:
                trainer.fit(crashing, datamodule=ToyStream(N_EXP, EPE))
            except RuntimeError as err:
                assert "simulated crash" in str(err)
            shutil.copy(Path(tmp) / "last.ckpt", HERE / f"{name}.ckpt")
        print("wrote", name)


if __name__ == "__main__":
    main()
