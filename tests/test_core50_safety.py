"""CORe50 from local files: no untrusted pickle is ever unpickled, and Avalanche never reaches its download.

No real dataset is needed: a tiny folder with CORe50's layout (two objects,
18 images of 4x4 pixels, the NI scenario's file lists for run 0) is written
under ``tmp_path``. Its pickles are harmless but not the genuine files, so the
tests that build a benchmark from it accept their MD5 sums explicitly
(``trust_fake_pickles``).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest

from cl_plugin.benchmarks import MissingDatasetError, benchmark_by_name, registry
from cl_plugin.errors import ConfigError

PICKLES = ("paths.pkl", "LUP.pkl", "labels.pkl", "labels2names.pkl")


class _CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: a pickle that runs code when loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_pickle(marker: Path) -> bytes:
    return pickle.dumps(_CreatesMarker(marker))


def write_fake_core50(root: Path) -> Path:
    """CORe50's layout for the NI scenario, run 0: 2 objects x 9 images, one image per object per batch."""
    from PIL import Image

    paths = [f"s1/o{c + 1}/C_01_{c + 1:02d}_{i:03d}.png" for c in range(2) for i in range(9)]
    labels = [int(p.split("/")[1][1:]) - 1 for p in paths]
    for p in paths:
        (root / "core50_128x128" / p).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / "core50_128x128" / p)
    lists = root / "batches_filelists" / "NI_inc" / "run0"
    lists.mkdir(parents=True)
    def filelist(indices):
        return "".join(f"{paths[j]} {labels[j]}\n" for j in indices)

    for b in range(8):
        (lists / f"train_batch_{b:02d}_filelist.txt").write_text(filelist((b, 9 + b)))
    (lists / "test_filelist.txt").write_text(filelist((8, 17)))
    # What Avalanche's CORe50Dataset indexes: LUP[scenario][run][batch] (the last one: test), labels[...][run][batch].
    (root / "paths.pkl").write_bytes(pickle.dumps(paths))
    (root / "LUP.pkl").write_bytes(pickle.dumps({"ni": [[[b, 9 + b] for b in range(8)] + [[8, 17]]]}))
    (root / "labels.pkl").write_bytes(pickle.dumps({"ni": [[labels] + [[] for _ in range(8)]]}))
    (root / "labels2names.pkl").write_bytes(pickle.dumps({"ni": [{0: "plug_adapter1", 1: "plug_adapter2"}]}))
    return root


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def downloads(monkeypatch):
    """Every call Avalanche makes to its CORe50 download; the download itself always fails."""
    from avalanche.benchmarks.datasets.core50 import CORe50Dataset

    calls = []

    def no_download(self):
        calls.append(self.root)
        raise RuntimeError("test: Avalanche tried to download CORe50")

    monkeypatch.setattr(CORe50Dataset, "_download_dataset", no_download)
    return calls


@pytest.fixture
def trust_fake_pickles(monkeypatch):
    """Accept the fake folder's pickles as if they were the genuine files."""

    def trust(root: Path, except_for: tuple[str, ...] = ()) -> None:
        sums = {n: md5(root / n) for n in PICKLES if n not in except_for}
        monkeypatch.setattr(registry, "_CORE50_MD5", {**registry._CORE50_MD5, **sums})

    return trust


def test_checksums_are_avalanches():
    """The sums come from Avalanche's own download table; a change there must be looked at here."""
    from avalanche.benchmarks.datasets.core50 import core50_data

    published = {name: md5sum for name, _url, md5sum in core50_data.data if name.endswith(".pkl")}
    assert registry._CORE50_MD5 == published


def test_a_hostile_paths_pkl_is_refused_and_never_unpickled(tmp_path, downloads, trust_fake_pickles):
    proof = tmp_path / "proof"
    pickle.loads(hostile_pickle(proof)).close()  # it really is hostile: loading it creates a file
    assert proof.exists()

    root = write_fake_core50(tmp_path / "core50")
    trust_fake_pickles(root, except_for=("paths.pkl",))  # even with the other three accepted
    marker = tmp_path / "marker"
    (root / "paths.pkl").write_bytes(hostile_pickle(marker))
    with pytest.raises(ConfigError) as info:
        benchmark_by_name("core50", dataset_root=root, scenario="ni")
    message = str(info.value)
    assert "paths.pkl is not the genuine file" in message and "pickle.load" in message
    assert "https://vlomonaco.github.io/core50/data/paths.pkl" in message and str(root) in message
    for other in PICKLES[1:]:
        assert other not in message
    assert not isinstance(info.value, MissingDatasetError)
    assert not marker.exists()
    assert downloads == []


def test_every_untrusted_pickle_is_named(tmp_path, downloads):
    root = write_fake_core50(tmp_path)  # harmless pickles, but none is the genuine file
    with pytest.raises(ConfigError, match=r"paths\.pkl, LUP\.pkl, labels\.pkl, labels2names\.pkl are not the genuine"):
        benchmark_by_name("core50", dataset_root=root, scenario="ni")
    assert downloads == []


def test_a_malformed_harmless_pickle_is_refused(tmp_path, downloads, trust_fake_pickles):
    root = write_fake_core50(tmp_path)
    trust_fake_pickles(root, except_for=("LUP.pkl",))
    (root / "LUP.pkl").write_bytes(pickle.dumps("not a lookup table"))
    with pytest.raises(ConfigError, match=r"LUP\.pkl is not the genuine file.*data/LUP\.pkl"):
        benchmark_by_name("core50", dataset_root=root, scenario="ni")
    (root / "LUP.pkl").write_bytes(b"\x80\x05 truncated")  # not even a pickle
    with pytest.raises(ConfigError, match=r"LUP\.pkl is not the genuine file"):
        benchmark_by_name("core50", dataset_root=root, scenario="ni")
    assert downloads == []


def test_missing_files_are_listed(tmp_path, downloads, trust_fake_pickles):
    root = write_fake_core50(tmp_path)
    trust_fake_pickles(root)
    (root / "labels.pkl").unlink()
    (root / "batches_filelists" / "NI_inc" / "run0" / "train_batch_03_filelist.txt").unlink()
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(MissingDatasetError) as info:
        benchmark_by_name("core50", dataset_root=root, scenario="ni")
    message = str(info.value)
    assert "2 of the files it needs are missing there: labels.pkl, " in message
    assert "batches_filelists/NI_inc/run0/train_batch_03_filelist.txt" in message
    assert "Nothing is downloaded" in message
    with pytest.raises(MissingDatasetError, match=r"batches_filelists/NI_inc/run4/(,|\.| )"):
        benchmark_by_name("core50", dataset_root=root, scenario="ni", run=4)
    with pytest.raises(MissingDatasetError, match=r"core50_32x32/"):
        benchmark_by_name("core50", dataset_root=root, scenario="ni", mini=True)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing created or fetched
    assert downloads == []


def test_a_damaged_file_list_is_an_error_not_a_download(tmp_path, downloads, trust_fake_pickles):
    """Avalanche alone would download here: a file list it cannot parse makes its loader fail."""
    from avalanche.benchmarks.classic import CORe50

    root = write_fake_core50(tmp_path)
    trust_fake_pickles(root)
    (root / "batches_filelists" / "NI_inc" / "run0" / "train_batch_05_filelist.txt").write_text("no label here\n")
    with pytest.raises(ConfigError, match=r"Avalanche cannot load CORe50's metadata.*Nothing was downloaded"):
        benchmark_by_name("core50", dataset_root=root, scenario="ni")
    assert downloads == []

    with pytest.raises(RuntimeError, match="tried to download"):  # the control: Avalanche's own call
        CORe50(scenario="ni", dataset_root=root)
    assert downloads == [root]


def test_genuine_files_build_the_benchmark_without_a_download(tmp_path, downloads, trust_fake_pickles):
    root = write_fake_core50(tmp_path)
    trust_fake_pickles(root)
    bm = benchmark_by_name("core50", dataset_root=root, scenario="ni")
    assert [len(e.dataset) for e in bm.train_stream] == [2] * 8
    assert len(bm.test_stream) == 1 and len(bm.test_stream[0].dataset) == 2
    assert sorted({int(y) for e in bm.train_stream for y in e.dataset.targets}) == [0, 1]
    assert downloads == []
