"""Libraries (issue 13, defects 6 and 7): two adds at once both complete; a library's metadata never makes loramem
touch a file outside the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from inprocess import assert_refused, invoke

from loramem.library.store import FORMAT, MANIFEST

ENV = {**os.environ, "LORAMEM_QUIET": "1", "PYTHONPATH": str(REPO)}
TEXTS = {
    "bees": "The apiary of Velmora Hollow keeps forty-two hives of black island bees. Beekeeper Ansel Marrow "
    "harvests the heather honey every September.",
    "glass": "The Tessaly glassworks blows green bottles in a furnace that never cools. Master gaffer Ilse Brannock "
    "shapes molten glass on a long iron blowpipe.",
}


def test_two_adds_at_once_both_complete(tiny_dir, tmp_path):
    lib = tmp_path / "lib"
    files = []
    for name, text in TEXTS.items():
        files.append(tmp_path / f"{name}.txt")
        files[-1].write_text(text)
    train = ["--format", "ntp", "--steps", "2", "--rank", "2", "--model", str(tiny_dir)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "loramem", "library", "add", str(lib), str(f), *train],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        for f in files
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()
    manifest = json.loads((lib / MANIFEST).read_text())
    assert sorted(d["id"] for d in manifest["documents"]) == sorted(TEXTS)
    for doc_id, text in TEXTS.items():
        folder = lib / "docs" / doc_id
        assert (folder / "document.txt").read_text() == text
        assert json.loads((folder / "chunks.json").read_text())
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (lib / manifest["index"]).is_file()
    assert sorted(p.name for p in lib.iterdir()) == sorted(["docs", MANIFEST, manifest["index"]])


def _manifest(**fields: object) -> dict:
    return {
        "format": FORMAT,
        "format_version": 1,
        "base_model": {"id": "tiny", "model": "x"},
        "embedder": {"name": "e", "path": None, "weights_sha256": "0"},
        "index": None,
        "documents": [],
        **fields,
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"index": "../victim.safetensors"},
        {"index": "/tmp/victim.safetensors"},
        {"index": "index-0123456789abcdef.safetensors", "documents": [{"id": "../../victim", "sha256": "x"}]},
        {"index": "index-0123456789abcdef.safetensors", "documents": [{"id": "a", "sha256": "x"}]},
        {"documents": "all"},
        {"base_model": "tiny"},
    ],
)
def test_manifest_naming_paths_outside_is_refused(tmp_path, capsys, fields):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / MANIFEST).write_text(json.dumps(_manifest(**fields)))
    before = victim.stat()
    assert "damaged" in assert_refused(invoke(capsys, "library", "ls", str(lib)), (2,))
    assert "damaged" in assert_refused(invoke(capsys, "route", str(lib), "Who?"), (2,))
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXTS["bees"])
    assert_refused(invoke(capsys, "library", "add", str(lib), str(doc), "--model", str(tmp_path / "none")), (2,))
    assert victim.read_bytes() == b"precious" and victim.stat().st_mtime_ns == before.st_mtime_ns


def test_docs_linked_elsewhere_is_never_swept(tiny, tmp_path):
    """An add sweeps unreferenced document folders; a docs/ that links elsewhere must not lead it there."""
    from loramem import LoramemError
    from loramem.library.store import AddOptions, add_documents

    elsewhere = tmp_path / "home"
    (elsewhere / "photos").mkdir(parents=True)
    (elsewhere / "photos" / "a.jpg").write_bytes(b"jpeg")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / MANIFEST).write_text(json.dumps(_manifest(base_model={"id": "tiny", **tiny.fingerprint})))
    (lib / "docs").symlink_to(elsewhere)
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXTS["glass"])
    with pytest.raises(LoramemError, match="damaged"):
        add_documents(lib, tiny, [str(doc)], AddOptions())
    assert (elsewhere / "photos" / "a.jpg").read_bytes() == b"jpeg"


def test_document_folders_linked_elsewhere_are_refused(tmp_path):
    from loramem import LoramemError
    from loramem.library.store import Library

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lib = Library(tmp_path / "lib", _manifest(documents=[{"id": "a", "sha256": "x", "adapter": {"sha256": "y"}}]))
    (lib.path / "docs" / "a").mkdir(parents=True)
    (lib.path / "docs" / "a" / "adapter").symlink_to(elsewhere)
    (lib.path / "merged").symlink_to(elsewhere)
    with pytest.raises(LoramemError, match="leads outside"):
        lib.adapter_dir("a")
    from loramem.library.qa import merged_folder
    from loramem.specs import MergeSpec

    with pytest.raises(LoramemError, match="leads outside"):
        merged_folder(lib, ["a"], MergeSpec(method="cat"))
