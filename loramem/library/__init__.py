"""Adapter libraries: the on-disk store, sentence embeddings and routing, answering from a library."""

# Routing defaults of `route`, `ask --library` and the eval's library modes (declared with RouteSpec).
from loramem.specs.answer import MERGE, TOP_K

__all__ = ["MERGE", "TOP_K"]
