"""Document LoRA adapters: attach and modes, training, QA synthesis, merging."""
