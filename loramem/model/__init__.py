"""The model: loading and fingerprints, chat-template framing, decoding."""

# Decoding batches (`loramem.answer.answer_batch`): the default batch is as many rows as this many cached
# tokens allow (a document shared by the rows counted once, else once per row: `answer.batch_tokens`), and never
# more rows than MAX_BATCH (on CPU, decoding speed stops growing well before).
MAX_BATCH_TOKENS = 32768
MAX_BATCH = 16
# New tokens an answer may take (`ask`, `answer_batch`, `ask_library`); the eval's own default is shorter.
MAX_NEW_TOKENS = 64
