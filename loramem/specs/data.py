"""Dataset specs: converting a known dataset layout, and inventing fiction."""

from __future__ import annotations

from loramem.specs.base import Spec, setting
from loramem.vocab import NarrativeQASplit

SEED = 0  # of invented fiction and of train splits, when none is given
FICTION_DOCS = 36  # documents `data synth-fiction` invents by default


class ConvertSpec(Spec):
    """How a dataset is converted: which split, and how many of each document's questions become training pairs."""

    split: NarrativeQASplit | None = setting(None, "NarrativeQA split")
    train_split: float = setting(
        0.0,
        "Move this fraction of each document's questions into train_qa (adapter supervision), never overlapping qa",
        ge=0,
        lt=1,
    )
    seed: int = setting(SEED, "Seed of the --train-split draw")


class FictionSpec(Spec):
    """Invented documents: facts no model can know, with training and held-out QA."""

    n_docs: int = setting(FICTION_DOCS, "Number of invented documents", ge=1)
    seed: int = setting(SEED, "Seed of the invented documents (the same seed, the same ones)")
