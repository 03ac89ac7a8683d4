"""Adapter libraries: the on-disk store, sentence embeddings and routing, answering from a library."""

# Routing defaults of `route`, `ask --library` and the eval's library modes: documents routed to, and how their
# adapters merge.
TOP_K = 3
MERGE = "ties"
