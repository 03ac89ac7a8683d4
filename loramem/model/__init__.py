"""The model: loading and fingerprints, chat-template framing, decoding."""
