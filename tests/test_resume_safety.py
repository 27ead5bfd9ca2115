"""Every way a resume can go wrong either works exactly or raises a named error before anything changes.

The checkpoints are written here and resumed in a fresh process
(``resume_cases.py``), so nothing carries over in memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import resume_cases

WORKS = {"error": None, "same_as_reference": True}

# case -> what the resumed run must report
EXPECTED = {
    "mm_same": dict(WORKS, num_tasks=3),
    "mm_scale": {"error": None, "num_tasks": 3, "equals_theta0_plus_scale_merged": True},
    "mm_method": {"error": "ConfigError", "message": r"method: checkpoint 'magmax', now 'average'"},
    "mm_start_from": {"error": "ConfigError", "message": r"start_from: checkpoint 'finetuned', now 'pretrained'"},
    "mm_exclude": {"error": "ConfigError", "message": r"exclude: checkpoint \[\], now \['net.3.\*'\]"},
    "mm_legacy_key": dict(WORKS, num_tasks=3),
    "mm_format_version": {"error": "CheckpointError", "message": r"format_version=99, newer than this cl-plugin reads"},
    "mm_finished_string": {"error": "CheckpointError", "message": r"experiences_finished='two'"},
    "mm_finished_wrong": {"error": "CheckpointError", "message": r"2 finished experience\(s\) but its merger holds 1"},
    "mm_missing_merger": {"error": "CheckpointError", "message": r"has no 'merger' entry"},
    "mm_missing_theta0": {"error": "CheckpointError", "message": r"has no 'theta0' entry"},
    "mm_theta0_none": {"error": "CheckpointError", "message": r"has a merge but no θ₀; it is damaged"},
    "mm_num_tasks_negative": {"error": "CheckpointError", "message": r"num_tasks"},
    "mm_merger_nan": {"error": "CheckpointError", "message": r"NaN|non-finite|infinite"},
    "mm_theta0_nan": {"error": "CheckpointError", "message": r"theta0\['net.0.weight'\] holds NaN"},
    "mm_theta0_shape": {"error": "CheckpointError", "message": r"theta0\['net.0.weight'\] is \(3, 3\)"},
    "mm_theta0_dtype": {"error": "CheckpointError", "message": r"torch.float16, the model's tensor is .* torch.float32"},
    "opcm_alpha": {"error": "ConfigError", "message": r"method_options: checkpoint \{'alpha': 0.5\}, now \{'alpha': 0.3\}"},
    "plain_into_merging": {"error": "CheckpointError", "message": r"holds no ModelMerging state.*base_weights"},
    "plain_with_base_weights": {"error": None, "num_tasks": 2},
    # Lightning itself refuses to resume `fit` from a weights-only checkpoint, before any callback acts.
    "weights_only": {"error": "KeyError", "message": r"checkpoint contains only the model"},
    "ce_same": dict(WORKS, results_same=True),
    "ce_compare_added": {"error": "ConfigError", "message": r"compare: checkpoint \['ties'\], now \['ties', 'average'\]"},
    "ce_options": {"error": "ConfigError", "message": r"method_options: checkpoint \{\}, now \{'ties': \{'top_k': 0.5\}\}"},
    "ce_scales": {"error": "ConfigError", "message": r"scales: checkpoint \{\}, now \{'ties': 0.3\}"},
    "lora_same": dict(WORKS, experiences_finished=3),
    "lora_method": {"error": "ConfigError", "message": r"method: checkpoint 'magmax', now 'average'"},
    "lora_start_from": {"error": "ConfigError", "message": r"start_from: checkpoint 'pretrained', now 'finetuned'"},
    "lora_scale": {"error": None, "experiences_finished": 3},
    "share_same": dict(WORKS, experiences_finished=3),
    "share_k": {"error": "ConfigError", "message": r"k: checkpoint 8, now 6"},
}


def test_every_case_has_an_expectation():
    assert set(EXPECTED) == set(resume_cases.CASES)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    resume_cases.write_runs(root)
    out = root / "outcomes.json"
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(here / "resume_cases.py"), str(root), str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=root,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXPECTED))
def test_resume_in_a_fresh_process(outcomes, case):
    import re

    outcome = outcomes[case]
    expected = EXPECTED[case]
    assert outcome["error"] == expected["error"], outcome["message"][-2000:]
    if expected["error"] is not None:
        assert re.search(expected["message"], outcome["message"]), outcome["message"]
        # Refused before anything changed: every callback still holds what its constructor left.
        assert all(outcome["fresh"]), outcome
    for key, value in expected.items():
        if key not in ("error", "message"):
            assert outcome[key] == value, (key, outcome)
