"""Evaluation datasets: the JSONL format, converters, invented fiction."""

from loramem.specs.data import FICTION_DOCS, SEED

__all__ = ["FICTION_DOCS", "SEED"]
