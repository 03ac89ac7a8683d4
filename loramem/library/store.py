"""Adapter libraries: many documents in one folder, each with its adapter (and KV cache), routed by embeddings.

Layout of a library folder:
  library.json              manifest: base-model fingerprint, embedder, documents, the current index file
  index-<sha>.safetensors   chunk embeddings [chunks, dim], with each chunk's document and chunk number
  docs/<id>/                document.txt, chunks.json, adapter/ (PEFT), cache.safetensors (optional)

An add is all or nothing: new documents are built in a staging folder, renamed into docs/, the new index
is written under a new name, and rewriting library.json (atomically) is the one step that commits them.
A failure or Ctrl-C before that removes what was added; a killed process leaves only unreferenced files,
which the next add sweeps away.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from loramem._version import __version__
from loramem.adapters.attach import adapter_sha256, attach_adapter, detach_adapter, read_adapter_meta
from loramem.adapters.train import train_adapter
from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.fileio import atomic_write_bytes, locked_folder, read_text
from loramem.library import TOP_K
from loramem.library.embed import CHUNK_MAX_WORDS, CHUNK_TARGET_WORDS, Embedder, chunk_text, load_embedder
from loramem.log import log, warn
from loramem.model.loading import LoadedModel, sha256_bytes, sha256_text
from loramem.model.prompt import check_template_record
from loramem.specs import SynthSpec, TrainSpec
from loramem.specs.base import refuse

FORMAT = "loramem.library.store"
FORMAT_VERSION = 1
MANIFEST = "library.json"
DOCS = "docs"
DOCUMENT_FILE = "document.txt"
CHUNKS_FILE = "chunks.json"
ADAPTER_DIR = "adapter"
CACHE_FILE = "cache.safetensors"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_INDEX = re.compile(r"index-[0-9a-f]{16}\.safetensors")


@dataclass
class Library:
    """A library folder and its manifest (None while the folder is still empty)."""

    path: Path
    manifest: dict[str, Any] | None
    _index: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # read once, for many questions

    @property
    def documents(self) -> list[dict[str, Any]]:
        return self.manifest["documents"] if self.manifest else []

    @property
    def base_model_id(self) -> str | None:
        return self.manifest["base_model"]["id"] if self.manifest else None

    def doc_dir(self, doc_id: str) -> Path:
        return self.inside(self.path / DOCS / doc_id)

    def inside(self, path: Path) -> Path:
        """`path`, refused unless it resolves inside the library: metadata must never reach a file elsewhere."""
        if not path.resolve().is_relative_to(self.path.resolve()):
            raise LoramemError(f"library {self.path} is damaged: {path.relative_to(self.path)} leads outside it")
        return path

    def adapter_dir(self, doc_id: str) -> Path:
        return self.inside(self.doc_dir(doc_id) / ADAPTER_DIR)

    def chunks(self, doc_id: str) -> list[str]:
        return json.loads(self.inside(self.doc_dir(doc_id) / CHUNKS_FILE).read_text())

    def index(self) -> dict[str, torch.Tensor]:
        """embeddings [n, dim] float32, document [n] (position in `documents`), chunk [n] (number in its document)."""
        from safetensors.torch import load_file

        if not self.manifest:
            return {
                "embeddings": torch.zeros(0, 0),
                "document": torch.zeros(0, dtype=torch.int32),
                "chunk": torch.zeros(0, dtype=torch.int32),
            }
        if self._index is None:
            where = self.inside(self.path / self.manifest["index"])
            if not where.is_file():
                raise LoramemError(f"library {self.path} is damaged: its index {where.name} is missing")
            self._index = load_file(str(where))
        return self._index


def open_library(path: str | Path) -> Library:
    """Read a library folder; an empty folder is an empty library."""
    folder = Path(path)
    if not folder.exists():
        raise LoramemError(f"library not found: {path}")
    if not folder.is_dir():
        raise LoramemError(f"{path} is a file, not a library folder")
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        if any(not p.name.startswith(".") for p in folder.iterdir()):
            raise LoramemError(f"{path} is not a loramem library (no {MANIFEST})")
        return Library(folder, None)
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoramemError(f"{manifest_file} is not readable JSON") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoramemError(f"{manifest_file} is not a loramem library manifest")
    version = manifest.get("format_version", 0)
    if type(version) is not int:
        raise LoramemError(f"{manifest_file} has a format_version that is not an integer")
    if version > FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"library {path} has format version {manifest['format_version']}; this "
            f"loramem reads version {FORMAT_VERSION} (upgrade loramem)"
        )
    _check_manifest(manifest, manifest_file)
    return Library(folder, manifest)


def _check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """The manifest fields that name files or are read as structures: the index a plain index file name, every
    document id a plain folder name, so nothing in the manifest can point outside the library."""
    index = manifest.get("index")
    if index is not None and (not isinstance(index, str) or not _INDEX.fullmatch(index)):
        raise LoramemError(f"{where} is damaged: its index {index!r} is not an index file name of this library")
    documents = manifest.get("documents")
    if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
        raise LoramemError(f"{where} is damaged: documents must be a list of objects")
    ids = [d.get("id") for d in documents]
    for doc_id in ids:
        if not isinstance(doc_id, str) or not _ID.fullmatch(doc_id):
            raise LoramemError(f"{where} is damaged: document id {doc_id!r} is not a plain folder name")
    for doc in documents:
        if not isinstance(doc.get("sha256"), str) or not isinstance(doc.get("adapter"), dict):
            raise LoramemError(f"{where} is damaged: document {doc['id']} lacks its sha256 or adapter record")
    if len(set(ids)) != len(ids):
        raise LoramemError(f"{where} is damaged: a document id appears twice")
    if documents and index is None:
        raise LoramemError(f"{where} is damaged: it lists documents but no index")
    for key in ("base_model", "embedder"):
        if not isinstance(manifest.get(key), dict):
            raise LoramemError(f"{where} is damaged: {key} must be an object")
    if not isinstance(manifest["base_model"].get("model"), str):
        raise LoramemError(f"{where} is damaged: base_model has no model fingerprint")


@dataclass
class AddOptions:
    """How `add_documents` makes each document's adapter and cache."""

    train: TrainSpec = field(default_factory=TrainSpec)
    synth: SynthSpec = field(default_factory=SynthSpec)  # pairs synthesized per document when no qa file is given
    qa: str | None = None  # JSONL of training pairs: one document only
    adapter: str | None = None  # copy this adapter instead of training one: one document only
    doc_id: str | None = None  # one document only; default: the file name
    with_cache: bool = False
    truncate: bool = False  # with_cache: cut a document longer than the context
    embedder: str | None = None  # a local sentence-embedding model directory; only for a new library


@dataclass
class _Planned:
    """A document about to be added."""

    source: str
    text: str
    sha256: str
    doc_id: str


def _sweep(lib: Library) -> None:
    """Remove what a killed add left behind: staging folders, unreferenced document folders and indexes."""
    keep_docs = {d["id"] for d in lib.documents}
    keep_index = lib.manifest["index"] if lib.manifest else None
    docs = lib.path / DOCS
    if docs.is_symlink() or (docs.exists() and not docs.is_dir()):
        raise LoramemError(f"library {lib.path} is damaged: {DOCS} is not a folder of its own")
    for entry in lib.path.iterdir():
        leftover = (entry.name.startswith(".") and entry.name.endswith(".tmp")) or (
            _INDEX.fullmatch(entry.name) is not None and entry.name != keep_index
        )
        if leftover and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif leftover:
            entry.unlink()  # a file, or a link (never what it points to)
    if docs.is_dir():
        for entry in docs.iterdir():
            if entry.name in keep_docs:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


def _new_id(source: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).stem if source != "-" else "").strip("-._")[:90] or "doc"
    doc_id, n = stem, 2
    while doc_id in taken:
        doc_id, n = f"{stem}-{n}", n + 1
    return doc_id


def _plan(lib: Library, texts: list[tuple[str, str]], doc_id: str | None) -> list[_Planned]:
    """The documents not yet in the library, with their ids; known ones are skipped with a log line."""
    known = {d["sha256"]: d["id"] for d in lib.documents}
    taken = {d["id"] for d in lib.documents}
    if doc_id is not None:
        if not _ID.fullmatch(doc_id):
            raise LoramemError(f"bad id {doc_id!r}: use letters, digits, '.', '_' and '-' (at most 100)")
        if doc_id in taken:
            raise LoramemError(f"id {doc_id!r} is already in library {lib.path}; choose another --id")
    planned: list[_Planned] = []
    for source, text in texts:
        sha = sha256_text(text)
        if sha in known:
            warn(f"{source} is already in the library (as {known[sha]}); not added again")
            continue
        chosen = doc_id or _new_id(source, taken)
        taken.add(chosen)
        known[sha] = chosen
        planned.append(_Planned(source, text, sha, chosen))
    return planned


def _check_adapter(lm: LoadedModel, path: str, document_sha: str) -> None:
    """A copied adapter must come from the library's base model (`lm`), fit it, and (if recorded) hold this
    document."""
    _, meta = read_adapter_meta(path)
    made_for = meta.get("base_model", {})
    if made_for.get("model") and made_for["model"] != lm.fingerprint["model"]:
        raise IncompatibleArtifactError(
            f"adapter {path} was trained on another base model ({made_for.get('id', '?')})"
            f" than this library's ({lm.model_id})"
        )
    if meta.get("document_sha256") and meta["document_sha256"] != document_sha:
        raise LoramemError(f"adapter {path} was trained on another document (sha256 {meta['document_sha256'][:12]})")
    attach_adapter(lm, path)  # raises if its shapes do not fit the model
    detach_adapter(lm)


def _check_embedder(manifest: dict[str, Any], embedder: Embedder) -> None:
    recorded = manifest["embedder"]
    if embedder.identity["weights_sha256"] != recorded["weights_sha256"]:
        raise IncompatibleArtifactError(
            f"this library was indexed with embedder {recorded['name']}, not "
            f"{embedder.identity['name']}; routing needs the same embedder"
        )


def library_embedder(lib: Library, embedder: Embedder | None = None) -> Embedder:
    """The given embedder checked against the library's, or the library's own loaded (load it once for many
    questions)."""
    manifest = lib.manifest
    if manifest is None:
        raise LoramemError(f"{lib.path} holds no documents yet; add some with `loramem library add`")
    embedder = embedder or load_embedder(manifest["embedder"]["path"])
    _check_embedder(manifest, embedder)
    return embedder


def check_model(lib: Library, fingerprint: dict[str, Any]) -> None:
    """Refuse a model other than the library's base model (`fingerprint` as LoadedModel.fingerprint): its adapters
    fit that one only."""
    if lib.manifest and fingerprint["model"] != lib.manifest["base_model"]["model"]:
        raise IncompatibleArtifactError(
            f"library {lib.path} holds adapters of another base model ({lib.base_model_id}); load that model (--model)"
        )
    if lib.manifest:
        check_template_record(lib.manifest["base_model"], fingerprint, f"library {lib.path}")


def _build(
    lm: LoadedModel,
    item: _Planned,
    folder: Path,
    options: AddOptions,
    embedder: Embedder,
    qa: list[tuple[str, str]] | None,
    qa_sha: str | None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """One document's folder (adapter trained or copied, cache, chunks) and its chunk embeddings."""
    folder.mkdir()
    (folder / DOCUMENT_FILE).write_text(item.text)
    chunks = chunk_text(item.text)
    (folder / CHUNKS_FILE).write_text(json.dumps(chunks, ensure_ascii=False) + "\n")
    if options.adapter:
        shutil.copytree(options.adapter, folder / ADAPTER_DIR)
        origin = str(options.adapter)
    else:
        log(f"{item.doc_id}: training its adapter")
        from loramem.data.synth import training_pairs

        pairs, written_by = training_pairs(
            lm, item.text, options.train.format, qa, options.synth.pairs, options.train.seed, options.synth.model
        )
        train_adapter(
            lm, item.text, pairs, folder / ADAPTER_DIR, options.train, qa_file_sha256=qa_sha, qa_written_by=written_by
        )
        origin = "trained"
    if options.with_cache:
        from loramem.kv.encode import encode

        (folder / CACHE_FILE).write_bytes(encode(lm, item.text, truncate=options.truncate).to_bytes())
    embeddings = embedder.encode(chunks)
    config, meta = read_adapter_meta(folder / ADAPTER_DIR)
    record = {
        "id": item.doc_id,
        "sha256": item.sha256,
        "source": item.source,
        "words": len(item.text.split()),
        "chunks": len(chunks),
        "adapter": {
            "rank": config.get("r"),
            "format": meta.get("format"),
            "origin": origin,
            "sha256": adapter_sha256(folder / ADAPTER_DIR),
        },
        "cache": options.with_cache,
        "added": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return record, embeddings


def _index_bytes(old: dict[str, torch.Tensor], first: int, new: list[torch.Tensor]) -> bytes:
    """The old index with the new documents' chunk rows appended (documents numbered from `first`)."""
    from safetensors.torch import save

    rows = [old["embeddings"]] if old["embeddings"].numel() else []
    document, chunk = [old["document"]], [old["chunk"]]
    for offset, embeddings in enumerate(new):
        rows.append(embeddings)
        document.append(torch.full((len(embeddings),), first + offset, dtype=torch.int32))
        chunk.append(torch.arange(len(embeddings), dtype=torch.int32))
    return save(
        {
            "embeddings": torch.cat(rows).float().contiguous(),
            "document": torch.cat(document),
            "chunk": torch.cat(chunk),
        },
        metadata={"format": "loramem.library.store-index"},
    )


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())


def _commit(
    lib: Library, manifest: dict[str, Any], staging: Path, records: list[dict[str, Any]], embeddings: list[torch.Tensor]
) -> None:
    """Move the staged documents in and write the new index, then commit by rewriting the manifest;
    on any failure before the manifest is written, undo the moves."""
    data = _index_bytes(lib.index(), len(manifest["documents"]), embeddings)
    index_name = f"index-{sha256_bytes(data)[:16]}.safetensors"
    docs = lib.path / DOCS
    made_docs = not docs.exists()
    moved: list[Path] = []
    try:
        atomic_write_bytes(lib.path / index_name, data)
        docs.mkdir(exist_ok=True)
        for record in records:
            os.replace(staging / record["id"], docs / record["id"])
            moved.append(docs / record["id"])
        _write_manifest(lib.path, {**manifest, "index": index_name, "documents": manifest["documents"] + records})
    except BaseException:
        for folder in moved:
            shutil.rmtree(folder, ignore_errors=True)
        if made_docs:
            shutil.rmtree(docs, ignore_errors=True)
        (lib.path / index_name).unlink(missing_ok=True)
        raise
    if lib.manifest and lib.manifest["index"] != index_name:
        (lib.path / lib.manifest["index"]).unlink(missing_ok=True)


def _new_manifest(lm: LoadedModel, embedder: Embedder) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "loramem_version": __version__,
        "base_model": {"id": lm.model_id, **lm.fingerprint},
        "embedder": embedder.identity,
        "chunking": {"target_words": CHUNK_TARGET_WORDS, "max_words": CHUNK_MAX_WORDS},
        "index": None,
        "documents": [],
    }


def add_documents(
    path: str | Path, lm: LoadedModel, documents: list[str], options: AddOptions, embedder: Embedder | None = None
) -> list[dict[str, Any]]:
    """Add the documents not yet in the library (by sha256), creating it if needed; returns the new records."""
    if not documents:
        raise LoramemError("no document given")
    if len(documents) > 1 and (options.adapter or options.qa or options.doc_id):
        raise LoramemError("--adapter, --qa and --id describe one document; add such documents one at a time")
    from loramem.data.synth import check_synth_request

    check_synth_request(options.train.format, options.synth.model, bool(options.qa or options.adapter))
    texts = [(source, read_text(source)) for source in documents]  # a bad file fails before any training
    qa, qa_sha = None, None
    if options.qa:
        from loramem.data.formats import load_qa_pairs

        pairs, qa_sha = load_qa_pairs(options.qa)
        qa = [(p.question, p.answer) for p in pairs]
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LoramemError(f"{path} is a file, not a library folder")
    with locked_folder(target, "library", committed=MANIFEST, wait=True):
        lib = open_library(target)
        _sweep(lib)
        check_model(lib, lm.fingerprint)
        planned = _plan(lib, texts, options.doc_id)
        if not planned:
            return []
        if options.adapter:
            _check_adapter(lm, options.adapter, planned[0].sha256)
        if embedder is None:
            recorded = lib.manifest["embedder"]["path"] if lib.manifest else None
            embedder = load_embedder(options.embedder or recorded, device=str(lm.device))
        manifest = lib.manifest or _new_manifest(lm, embedder)
        _check_embedder(manifest, embedder)
        staging = Path(tempfile.mkdtemp(prefix=".add-", suffix=".tmp", dir=target))
        try:
            built = [_build(lm, item, staging / item.doc_id, options, embedder, qa, qa_sha) for item in planned]
            _commit(lib, manifest, staging, [r for r, _ in built], [e for _, e in built])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [r for r, _ in built]


def _nonempty(path: str | Path | Library) -> Library:
    lib = path if isinstance(path, Library) else open_library(path)
    if not lib.documents:
        raise LoramemError(f"library {lib.path} is empty; add documents with: loramem library add {lib.path} DOC")
    return lib


def _similarities(lib: Library, question: str, embedder: Embedder | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Cosine similarity of the question to every chunk, and the index."""
    if not question.strip():
        raise LoramemError("the question is empty")
    index = lib.index()
    query = library_embedder(lib, embedder).encode([question])[0]
    return index["embeddings"] @ query, index


def check_top_k(library: str | Path | Library, k: int) -> Library:
    """The library, checked to be non-empty and to hold at least k documents (before any model is loaded)."""
    lib = _nonempty(library)
    n = len(lib.documents)
    if not 1 <= k <= n:
        refuse(f"must be between 1 and the library's {n} document(s), got {k}", "top_k")
    return lib


def route(
    library: str | Path | Library, question: str, k: int = TOP_K, embedder: Embedder | None = None
) -> list[tuple[str, float]]:
    """The k documents whose best chunk is closest to the question, best first: [(id, cosine similarity)]."""
    lib = check_top_k(library, k)
    n = len(lib.documents)
    sims, index = _similarities(lib, question, embedder)
    best = torch.full((n,), -2.0).scatter_reduce(0, index["document"].long(), sims, "amax")
    order = sorted(range(n), key=lambda i: -float(best[i]))[:k]
    return [(lib.documents[i]["id"], float(best[i])) for i in order]


@dataclass
class Chunk:
    """A retrieved passage: its document, its number there, its similarity to the question and its text."""

    doc_id: str
    index: int
    score: float
    text: str


def retrieve_chunks(
    library: str | Path | Library, question: str, n: int = 5, embedder: Embedder | None = None
) -> list[Chunk]:
    """The n chunks closest to the question across the library, best first (fewer if the library has fewer)."""
    if n < 1:
        raise LoramemError(f"the number of chunks must be at least 1, got {n}")
    lib = _nonempty(library)
    sims, index = _similarities(lib, question, embedder)
    top = torch.topk(sims, min(n, len(sims)))
    found = []
    for score, row in zip(top.values.tolist(), top.indices.tolist()):
        doc_id = lib.documents[int(index["document"][row])]["id"]
        number = int(index["chunk"][row])
        found.append(Chunk(doc_id, number, score, lib.chunks(doc_id)[number]))
    return found
