"""Evaluation datasets: the JSONL format, converters, invented fiction."""

SEED = 0  # of invented fiction and of train splits, when none is given
FICTION_DOCS = 36  # documents `data synth-fiction` invents by default
