"""The examples run as a user runs them: a fresh process, from the repository root.

Small settings (one epoch per experience, a two-epoch pretraining cached once
for the file under pytest's temporary directory) keep each example well under a
minute on two idle cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cl_plugin.merging import MERGERS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pretrain_cache(tmp_path_factory):
    """One cache of pretrained backbones for the examples of this file (each pretraining is done once)."""
    return tmp_path_factory.mktemp("pretrain_cache")
TIMEOUT_S = 240


def run_example(script: str, *args: str) -> str:
    """Run ``examples/<script>`` and return its stdout; fail with its output if it exits non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_merge_state_dicts_prints_every_method():
    out = run_example("merge_state_dicts.py", "--steps", "4")
    for method in MERGERS:
        assert any(line.startswith(method) and "mean" in line for line in out.splitlines()), out


@pytest.mark.slow
def test_magmax_trainer_prints_merged_and_finetuned_accuracy(pretrain_cache):
    # The one-fit style; the per-experience loop and DDP are covered in test_callbacks.py.
    out = run_example(
        "magmax_trainer.py",
        "--epochs", "1",
        "--pretrain-epochs", "2",
        "--cache-dir", str(pretrain_cache),
    )
    assert "final test accuracy per experience (split_digits, one-fit, magmax)" in out, out
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines() if line.startswith(("merged", "sequential"))}
    assert set(rows) == {"merged (magmax)", "sequential fine-tuning"}, out
    for values in rows.values():
        assert len(values) == 6  # five experiences and the average
        assert all(0.0 <= float(v) <= 1.0 for v in values), out


@pytest.mark.slow
@pytest.mark.parametrize("method, per_task_bytes", [("share", 9_512), ("lora", 100_904)])
def test_adapters_trainer_prints_accuracy_forgetting_and_bytes(pretrain_cache, method, per_task_bytes):
    out = run_example(
        "adapters_trainer.py",
        "--method", method,
        "--epochs", "1",
        "--pretrain-epochs", "2",
        "--cache-dir", str(pretrain_cache),
    )
    accuracy = [line.split()[1:] for line in out.splitlines() if line.startswith("accuracy")]
    assert len(accuracy) == 1 and len(accuracy[0]) == 6, out  # five experiences and the average
    assert all(0.0 <= float(v) <= 1.0 for v in accuracy[0]), out
    # Share (K=24, p=3): 12 layers x 2 sides x 24 x 3 floats + the 650-float head; LoRA r=8: 12 adapters + head
    assert f"bytes stored per task {per_task_bytes:,}" in out, out
    assert "one head per task" in out, out
