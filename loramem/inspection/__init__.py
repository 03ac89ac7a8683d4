"""`inspect`'s maps of what an artifact holds: which tokens a cache kept (`kept`), how two caches differ, and what
an adapter's update weighs per layer and module (`updates`); rendered for the terminal (`show`) and as PNGs
(`plots`). Computed from the files alone: no model is loaded, and a tokenizer only when it is on this machine."""
