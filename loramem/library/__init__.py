"""Adapter libraries: the on-disk store, sentence embeddings and routing, answering from a library."""
