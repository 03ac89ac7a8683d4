"""The model: loading and fingerprints, chat-template framing, decoding."""

# Decoding batches (`loramem.answer.answer_batch`): the default batch is as many rows as this many cached
# tokens allow (a document shared by the rows counted once, else once per row: `answer.batch_tokens`), and never
# more rows than MAX_BATCH (on CPU, decoding speed stops growing well before).
from loramem.specs.answer import MAX_BATCH, MAX_BATCH_TOKENS, MAX_NEW_TOKENS

__all__ = ["MAX_BATCH", "MAX_BATCH_TOKENS", "MAX_NEW_TOKENS"]
