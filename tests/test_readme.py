"""The README's first Python snippet runs as written, on a module written as Lightning's docs write one."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def first_python_block() -> str:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)[0]


def test_the_first_snippet_runs_and_leaves_the_merged_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning writes its logs and checkpoints under the working directory
    code = first_python_block()
    assert "x, y = batch" in code and "ModelMerging" in code
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    merging = next(cb for cb in namespace["trainer"].callbacks if type(cb).__name__ == "ModelMerging")
    assert merging.merger.num_tasks == namespace["dm"].n_experiences
    merged = merging.merged_state_dict(namespace["model"])
    live = namespace["model"].state_dict()
    assert all(live[n].equal(merged[n]) for n in merged)
