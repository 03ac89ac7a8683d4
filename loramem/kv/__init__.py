"""KV caches as files: the artifact, presses, prefill (encode), eviction (compress), value groups, storage dtypes."""
