"""What a question and its answer may take: the model's context and the memory of a decoding batch.

One rule for every front end (ask, ask --library, eval, a server): a question continues at the position its
cache ends (`n_tokens`, whatever was evicted), so the cached positions, the question's tokens and the answer
budget must fit the model's context. A budget past the room left is cut to it (with a warning); a question that
leaves no room at all is refused before any model work. A decoding batch pre-sizes its whole cache, so it is
also checked against the memory available before it is allocated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from loramem.errors import LoramemError
from loramem.log import warn
from loramem.sizes import format_size

# Tokens left free after the document for a question and its answer (encode refuses a document that leaves less).
QUESTION_RESERVE = 256


def _named(question: str) -> str:
    text = " ".join(question.split())
    return repr(text if len(text) <= 40 else text[:37] + "...")


def answer_budgets(context: int, rows: Sequence[tuple[str, int, int]], max_new_tokens: int) -> list[int]:
    """Each row's answer budget: `max_new_tokens`, cut to the room its (question, cached tokens, question tokens)
    leave in a `context`-token model. Refuses (exit 2) a question that leaves no room for one answer token."""
    budgets = []
    for question, cached, asked in rows:
        room = context - cached - asked
        if room < 1:
            held = f" after a {cached}-token cache" if cached else ""
            raise LoramemError(
                f"question {_named(question)} is {asked} tokens{held}: it does not fit the model's "
                f"{context}-token context with room for an answer; shorten the question or the document"
            )
        budgets.append(min(max_new_tokens, room))
    cut = [b for b in budgets if b < max_new_tokens]
    if cut:
        warn(
            f"max new tokens {max_new_tokens} cut to the room left in the model's {context}-token context "
            f"({max(cut)} tokens at most) for {len(cut)} of {len(rows)} questions"
        )
    return budgets


def check_questions(
    lm: Any, questions: Sequence[str], document: str | None = None, framing: str = "", remedy: str = "shorten it"
) -> None:
    """Refuse, before any model work, a document too long to encode (`document`, as `encode` frames it; the
    message ends with `remedy`) or a question that cannot follow it (None: closed-book, its whole chat prompt
    counted) with room for one answer token, in `framing` (empty: the default); the answering itself cuts each
    answer budget to its room."""
    from loramem.model.prompt import DEFAULT_FRAMING, closed_book_ids, document_ids, prefix_ids, question_ids

    frame = lm.framing(framing or DEFAULT_FRAMING)
    cached = 0
    if document is not None:
        cached = len(prefix_ids(lm.tokenizer, frame)) + len(document_ids(lm.tokenizer, document))
        if cached > lm.max_length - QUESTION_RESERVE:
            raise LoramemError(
                f"document is {cached} tokens framed; the model's {lm.max_length}-token context leaves room for "
                f"{lm.max_length - QUESTION_RESERVE} ({QUESTION_RESERVE} kept for the question): {remedy}"
            )
    rows = []
    for question in questions:
        ids = (
            question_ids(lm.tokenizer, frame, question, after_document=True)
            if document is not None
            else closed_book_ids(lm.tokenizer, frame, question)
        )
        rows.append((question, cached, len(ids)))
    answer_budgets(lm.max_length, rows, 1)


def check_records(lm: Any, records: Sequence[Any]) -> None:
    """`check_questions` for each dataset record (DocRecord: its document and held-out questions), so that an eval
    refuses them before its run folder is written."""
    for record in records:
        check_questions(lm, [qa.question for qa in record.qa], record.document)


def available_memory(device: Any) -> int | None:
    """Bytes free for a new allocation on `device` (None when unknown)."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_memory(config: Any, dtype_bytes: int, tokens: int, device: Any) -> None:
    """Refuse (exit 2) a decoding batch whose pre-sized cache, keys and values of `tokens` cached tokens over all
    rows in every layer, cannot fit the memory available: better than growing until the system kills it."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads if getattr(config, "hidden_size", None) and heads else None
    )
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(head_dim, int)):
        return  # a config this estimate cannot read: the allocation itself decides
    needed = 2 * layers * heads * head_dim * dtype_bytes * tokens
    free = available_memory(device)
    if free is not None and needed > free:
        raise LoramemError(
            f"a decoding batch of {tokens} cached tokens needs {format_size(needed)} for its cache, more than the "
            f"{format_size(free)} available; lower --max-new-tokens, --batch-size or --max-batch-tokens"
        )
