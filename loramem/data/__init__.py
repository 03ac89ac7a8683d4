"""Evaluation datasets: the JSONL format, converters, invented fiction."""
