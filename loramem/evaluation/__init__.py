"""The eval experiment: run, Ray, summaries and reports, metrics, statistics, probes."""
