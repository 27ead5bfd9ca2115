"""The boundary core sharded over 2 and 3 gloo processes equals the unsharded merge bit for bit, for every method.

Uneven shards (rows not divisible by the world size) and empty ones (a tensor
smaller than the world) are in the model; ``sharded_merge_script.py`` says how.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _gloo_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.ddp
@pytest.mark.parametrize("world, mode", [(2, "split"), (3, "split"), (2, "fsdp2")])
def test_sharded_merge_equals_the_unsharded_one(tmp_path, world, mode):
    if not _gloo_available():
        pytest.fail("torch.distributed with gloo is required for the sharded tests and is not available")
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(HERE / "sharded_merge_script.py"), str(out), str(world), mode],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results.pop("collectives") == {"complete_in_place": True, "share_from_owners": True, "whole_on_owner": True}
    control = results.pop("negative_control")
    # Under FSDP2: every method resumed from its state kept as DTensors of each rank's rows
    # (what a distributed checkpoint holds) ends as the unsharded merge.
    from_shards = results.pop("resumed_from_shards", None)
    assert from_shards == (None if mode == "split" else {m: True for m in results})
    assert control == {"exact_same_on_ranks": True, "per_rank_differs": True}
    assert set(results) >= {"magmax", "average", "task_arithmetic", "random", "ties", "opcm", "dop", "task_arithmetic+dare"}
    for method, outcome in results.items():
        # At W=2 the script plays a group that refuses CPU tensors (NCCL alone): the core made its own gloo group.
        assert outcome.pop("own_gloo_group") == (world == 2), method
        whole_matrices = outcome.pop("matrices_whole")
        assert outcome == {"equal": True, "resumed_equal": True, "written_equal": True, "sharded": True}, method
        # Under a split the core chooses (DDP), OPCM's matrices sit whole on their owners; other rules split evenly.
        assert whole_matrices == (method == "opcm" and mode == "split"), method


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """The Trainer script under DDP and under FSDP2 (ModelParallelStrategy), 2 processes each; then one process
    resumes the FSDP2 run's distributed checkpoint."""
    if not _gloo_available():
        pytest.fail("torch.distributed with gloo is required for the sharded tests and is not available")
    out = tmp_path_factory.mktemp("sharded-trainer")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    for mode in ("ddp", "fsdp2", "fsdp2-w1"):  # the last resumes the FSDP2 run's checkpoint on one process
        result = subprocess.run(
            [sys.executable, str(HERE / "sharded_trainer_script.py"), str(out), mode],
            capture_output=True, text=True, timeout=900, env=env, cwd=out,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_model_merging_in_a_sharded_trainer_equals_the_unsharded_merge(trainer_runs, mode):
    results = json.loads((trainer_runs / f"{mode}.json").read_text())
    resumed = results.pop("resumed_ties", None)
    # start_from="finetuned": the fine-tuned weights kept at fit end come back from the checkpoint.
    assert results.pop("kept_weights") == {"holds_merged": True, "restored_equals_kept": True, "kept_are_finetuned": True}
    # ModelMerging("opcm") beside ContinualEvaluation: the same merge as the evaluation's OPCM and as the
    # unsharded one, with the even split the evaluation's cores use (alone under DDP it places matrices whole).
    assert results.pop("opcm_beside_evaluation") == {
        "own_gloo_group": mode == "fsdp2", "equals_unsharded_merge": True, "logged_norms": [True, True], "num_tasks": 3, "sharded": True,
        "matrices_whole": False, "equals_evaluation": True, "accuracies_finite": True, "evaluation_restored": True,
        # under FSDP2 the compared methods' states go through the distributed checkpoint, under DDP whole
        "evaluation_mergers_in_meta": ["reference" if mode == "fsdp2" else "tensor"],
    }
    assert set(results) == {"magmax", "ties", "opcm"}
    for method, outcome in results.items():
        whole = outcome.pop("matrices_whole")
        # under FSDP2 the script plays a group that refuses CPU tensors: the core made its own gloo group
        assert outcome.pop("own_gloo_group") == (mode == "fsdp2"), method
        assert outcome == {"equals_unsharded_merge": True, "logged_norms": [True, True], "num_tasks": 3, "sharded": True}, method
        assert whole == (method == "opcm" and mode == "ddp"), method
    if mode == "fsdp2":
        # The state each rank restored from the distributed checkpoint is what was saved, and the stream goes on.
        # θ₀ and the merge went through torch.distributed.checkpoint (meta.pt holds references only; the
        # unsharded BatchNorm statistics stay whole there), and the resumed stream ends as the uninterrupted one.
        assert resumed == {
            "restored_equals_saved": True, "folded_at_restore": 1, "num_tasks": 3, "equals_uninterrupted": True,
            "meta_holds_references": True, "statistics_whole_in_meta": True,
            # rank 1's shard holds a NaN: it names it, rank 0 refuses too
            "damaged_shard_refused": ["another process", "NaN"],
        }
        # The same distributed checkpoint resumed on one process: DCP reshards, and the state is what was saved.
        assert json.loads((trainer_runs / "fsdp2-w1.json").read_text()) == {
            "restored_equals_saved": True, "num_tasks": 3, "sharded": False,
        }


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("method", ["magmax", "ties", "opcm"])
def test_fsdp2_and_ddp_end_with_the_same_weights(trainer_runs, method):
    ddp = torch.load(trainer_runs / f"ddp-{method}.pt", weights_only=True)
    fsdp2 = torch.load(trainer_runs / f"fsdp2-{method}.pt", weights_only=True)
    assert ddp.keys() == fsdp2.keys()
    for n in ddp:
        assert torch.equal(ddp[n], fsdp2[n]), n


@pytest.mark.parametrize("world", [1, 2, 3])
def test_owner_rounds_cover_each_item_once_with_one_item_per_rank_and_round(world):
    from cl_plugin.merging.layout import ShardLayout

    cost = {"a": 5.0, "b": 1.0, "c": 4.0, "d": 4.0, "e": 0.0, "f": 2.0, "g": 9.0}
    layout = ShardLayout.split({n: (3,) for n in cost}, rank=0, world=world)
    owners = layout.owners(cost)
    rounds = layout.rounds(owners, cost)
    assert sorted(n for r in rounds for n in r) == sorted(cost)
    order = list(owners)  # the order every rank computes owners in
    for r in rounds:
        assert len({owners[n] for n in r}) == len(r)  # one item per owner rank in a round
        assert r == sorted(r, key=order.index)  # every rank issues the collectives in one order
    # each rank's items come largest first, so a round holds items of similar cost
    for rank in range(world):
        mine = [cost[n] for r in rounds for n in r if owners[n] == rank]
        assert mine == sorted(mine, reverse=True)
    assert len(rounds) == max(sum(1 for n in cost if owners[n] == k) for k in range(world))


@pytest.mark.parametrize(
    "backend, cpu",
    [("gloo", True), ("nccl", False), ("cpu:gloo,cuda:nccl", True), ("cuda:nccl", False), ("undefined", True), ("xccl", False)],
)
def test_which_process_groups_take_cpu_tensors(monkeypatch, backend, cpu):
    # The core's collectives exchange CPU tensors; a group that cannot (NCCL alone) gets a gloo copy (cpu_group).
    from cl_plugin.merging import layout

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    assert layout.takes_cpu_tensors() is cpu
