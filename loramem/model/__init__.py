"""The model: loading and fingerprints, chat-template framing, decoding."""

# Decoding batches (`loramem.model.generate.answer_batch`): each row holds a copy of the document's cache, so
# the default batch is as many rows as this many cached tokens allow, and never more rows than MAX_BATCH
# (on CPU, decoding speed stops growing well before).
MAX_BATCH_TOKENS = 32768
MAX_BATCH = 16
# New tokens an answer may take (`ask`, `answer_batch`, `ask_library`); the eval's own default is shorter.
MAX_NEW_TOKENS = 64
