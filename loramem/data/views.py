"""Other views of a document, for `--format mixed`: the seed study's mix of QA with summaries and rewrites.

The seed study (LoRA as knowledge memory, PaperQA) found that mixing formats, QA pairs with summaries and rewrites
of the document, beats any single one: a fact seen in several wordings is anchored better. A view is a text a
model writes from one passage of the document (a summary of it, a rewrite of it in other words); the adapter
trains on it as raw text (next-token prediction) beside the QA pairs and the document itself. The writer is the
model being trained unless a stronger one is named (`--synth-model`), as for synthesized QA pairs; every view
records who wrote it. Greedy decoding makes the views of a document and a writer the same on every run.
"""

from __future__ import annotations

import dataclasses
import json

from loramem.adapters.train import View
from loramem.answer import answer_batch
from loramem.data.synth import passages, synth_writer
from loramem.log import log
from loramem.model.loading import LoadedModel
from loramem.text import strip_thinking

VIEW_KINDS = ("summary", "rewrite")
_ASK = {
    "summary": "Summarize this text in two or three sentences.",
    "rewrite": "Rewrite this text in other words, keeping every name, number and fact.",
}
# A passage is about 70 words (~100 tokens): room for a rewrite of it, a summary stops well before.
VIEW_TOKENS = 160
MIN_VIEW_WORDS = 5  # shorter replies (a refusal, an empty turn) are not a view of anything


def document_views(writer: LoadedModel, document: str, max_new_tokens: int = VIEW_TOKENS) -> list[View]:
    """A summary and a rewrite of every passage of the document, in passage order, written by `writer` (in batches,
    greedy); replies of fewer than MIN_VIEW_WORDS words are left out."""
    chunks = passages(document)
    asks = [(kind, index) for index in range(len(chunks)) for kind in VIEW_KINDS]
    # The prompt is the whole request: without the closed-book "Answer in a few words." in front of it.
    plain = dataclasses.replace(writer.framing(), instruction="")
    prompts = [f"Text:\n{chunks[index]}\n\n{_ASK[kind]}" for kind, index in asks]
    replies = answer_batch(writer, prompts, None, max_new_tokens=max_new_tokens, framing=plain) if prompts else []
    views = []
    for (kind, index), reply in zip(asks, replies):
        text = strip_thinking(reply.answer).strip()
        if len(text.split()) >= MIN_VIEW_WORDS:
            views.append(View(kind, index, text, writer.model_id))
    return views


def training_views(lm: LoadedModel, text: str, fmt: str, synth_model: str | None = None) -> list[View]:
    """The one rule for the views a document's adapter trains on: none but for format mixed, where `synth_model`
    (else `lm`) writes them."""
    if fmt != "mixed":
        return []
    writer = synth_writer(synth_model, lm)
    log(f"writing a summary and a rewrite of each passage ({writer.model_id})")
    return document_views(writer, text)


def read_views(lines: str) -> list[View]:
    """Views as `View.to_dict` wrote them, one JSON object a line (a run's cache of them)."""
    return [View(**json.loads(line)) for line in lines.splitlines() if line.strip()]
