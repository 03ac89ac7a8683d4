"""A document memory opened for answering: the model a ModelSpec names with the adapter attached, a stored cache
checked against it or a document encoded, and whether decoding uses the adapter in a mode. The one implementation
of these rules for `ask`, `chat` and scripts; modules are imported on use, so importing this one stays light."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loramem.specs import AskSpec, ModelSpec
from loramem.vocab import AdapterMode

if TYPE_CHECKING:
    from loramem.kv.cache import KVCache
    from loramem.model.loading import LoadedModel


def load(spec: ModelSpec, adapter: str | Path | None = None, *, answer_only: bool = False) -> LoadedModel:
    """The model a ModelSpec names, with `adapter` attached. `answer_only`: no adapter will be attached and no
    document encoded, so the default model may load without transformers."""
    from loramem.adapters.attach import attach_adapter
    from loramem.model.loading import load_model

    lm = load_model(
        spec.model,
        device=spec.device,
        dtype=spec.dtype,
        chat_template_kwargs=spec.chat_template_kwargs,
        answer_only=answer_only,
    )
    if adapter is not None:
        attach_adapter(lm, adapter)
    return lm


def open_memory(
    spec: AskSpec,
    model: ModelSpec,
    cache: KVCache | None,
    text: str | None,
    questions: list[str],
    *,
    answer_only: bool,
) -> tuple[LoadedModel, KVCache | None, float]:
    """The model with `spec`'s adapter, checked against `cache`, or `text` encoded (the `questions` checked to fit
    after it first): (model, cache, the document's prefill seconds). `answer_only`: no adapter will be attached
    later, so the default model may load without transformers."""
    from loramem.kv.cache import check_compatible
    from loramem.kv.encode import encode as encode_document
    from loramem.model.limits import check_questions

    # answering alone (no adapter, nothing to encode) needs no transformers for the default model
    lm = load(model, spec.adapter, answer_only=answer_only and spec.adapter is None and text is None)
    if cache is not None:
        check_compatible(cache, lm.fingerprint, spec.cache or "cache", lm)
    if text is None:
        return lm, cache, 0.0
    if not spec.truncate:  # before the prefill (a cut document leaves the room encode keeps for the question)
        check_questions(lm, questions, text, spec.framing, "shorten it or use --truncate")
    cache = encode_document(lm, text, framing=spec.framing, truncate=spec.truncate, with_adapter=spec.mode == "all")
    return lm, cache, float(cache.meta["prefill_seconds"])


def adapter_on(lm: LoadedModel, mode: AdapterMode, cache: KVCache | None) -> bool:
    """Whether decoding uses the attached adapter in `mode` over `cache` (closed-book: all is decode)."""
    from loramem.adapters.attach import check_adapter_mode

    if cache is None:
        return check_adapter_mode(lm, "decode" if mode == "all" else mode, None)
    return check_adapter_mode(lm, mode, cache.meta.get("adapter"))
