"""Answering specs: the model to load, how answers are decoded, and what `ask` answers from."""

from __future__ import annotations

from pydantic import model_validator

from loramem.specs.base import Spec, refuse, setting
from loramem.vocab import AdapterMode, Dtype, Framing, MergeMethod

# Decoding batches: by default as many rows as this many cached tokens allow (a document shared by the rows counted
# once, else once per row), never more rows than MAX_BATCH (on CPU, decoding speed stops growing well before).
MAX_BATCH_TOKENS = 32768
MAX_BATCH = 16
MAX_NEW_TOKENS = 64  # an answer's length limit for ask; the eval's own default is shorter
# Routing over a library: documents routed to, and how their adapters merge.
TOP_K = 3
MERGE: MergeMethod = "ties"


class ModelSpec(Spec):
    """Which model answers, where, in which precision, with which chat-template variables."""

    model: str | None = setting(
        None, "Hugging Face id, local model directory or .gguf file", short="-m", shown="embedded SmolLM2-135M-Instruct"
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: Dtype = setting("auto", "auto (fp32 on CPU, bf16 on CUDA), float32, float16, bfloat16")
    chat_template_kwargs: str | None = setting(
        None,
        "JSON object of chat-template variables, e.g. '{\"enable_thinking\": true}' (thinking is off by default "
        "where the template has the switch); recorded in caches and adapters, which then need the same",
    )


class AnswerSpec(Spec):
    """How answers are decoded: greedy, up to a length, in batches whose size never changes an answer."""

    max_new_tokens: int = setting(MAX_NEW_TOKENS, "Answer length limit, in tokens", ge=1)
    batch_size: int | None = setting(
        None,
        "Questions decoded together (answers do not change)",
        shown="as many as --max-batch-tokens allows, at most 16",
        runtime=True,
        ge=1,
    )
    max_batch_tokens: int = setting(
        MAX_BATCH_TOKENS,
        "Memory budget of a decoding batch, in cached tokens: a document shared by the rows once, else one per row "
        "at the batch's largest, plus each row's question and answer",
        runtime=True,
        ge=1,
    )


class RouteSpec(Spec):
    """Answering from an adapter library: where questions are routed and what the routed documents give."""

    top_k: int = setting(TOP_K, "Documents routed to; 1 uses that document's adapter as is", short="-k", ge=1)
    merge: MergeMethod = setting(MERGE, "How the top-k adapters merge")
    with_context: int = setting(0, "Also put the N best retrieved chunks in context (base-model cache)", ge=0)
    with_caches: bool = setting(
        False, "Put the routed documents' stored KV caches in context, side by side (library add --with-cache)"
    )

    @model_validator(mode="after")
    def _one_context(self) -> RouteSpec:
        if self.with_context and self.with_caches:
            raise ValueError("give with_context N or with_caches, not both")
        return self


class MemorySpec(Spec):
    """What answers come from (a stored cache, an adapter, a library, or nothing) and how they are decoded: the
    settings `ask`, `chat` and a server's requests share."""

    cache: str | None = setting(None, "Stored cache file (ask: - reads it from stdin)", short="-c")
    adapter: str | None = setting(None, "PEFT LoRA adapter directory", short="-a")
    adapter_mode: AdapterMode | None = setting(
        None,
        "none (base only), decode (adapter on for question and answer) or all (a cache encoded with it)",
        shown="decode with --adapter, else none",
    )
    library: str | None = setting(
        None, "Answer from an adapter library: route the question, decode with the routed documents' (merged) adapter"
    )
    framing: Framing = setting("chat", "Framing for --doc and closed-book questions")
    answer: AnswerSpec = setting(factory=AnswerSpec)
    route: RouteSpec = setting(factory=RouteSpec)

    @model_validator(mode="after")
    def _one_memory(self) -> MemorySpec:
        if self.library is not None:
            given = [name for name in ("cache", "adapter", "adapter_mode") if getattr(self, name)]
            if given:
                refuse("a library answers with its own adapters; leave these out", "library", *given)
        elif self.route.model_fields_set:
            refuse("routing settings need a library", *(f"route.{n}" for n in sorted(self.route.model_fields_set)))
        if self.adapter_mode not in (None, "none") and self.adapter is None:
            refuse(f"{self.adapter_mode} needs an adapter", "adapter_mode")
        return self

    @property
    def mode(self) -> AdapterMode:
        """The adapter mode: as given, else decode with an adapter and none without."""
        return self.adapter_mode or ("decode" if self.adapter else "none")


class AskSpec(MemorySpec):
    """What `ask` answers from (a stored cache, a document, an adapter, a library, or nothing) and how."""

    doc: str | None = setting(None, "Encode this document on the fly (nothing is written)")
    truncate: bool = setting(False, "With --doc: cut a document longer than the context")
    stream: bool | None = setting(
        None,
        "Write each answer as it is decoded (ask: not with --json)",
        shown="on when stdout is a terminal",
        runtime=True,
    )

    @model_validator(mode="after")
    def _cache_or_doc(self) -> AskSpec:
        if self.library is not None and self.doc:
            refuse("a library answers with its own adapters; leave these out", "library", "doc")
        if self.library is not None and self.stream:
            refuse("a library's answers are written whole, not streamed", "stream")
        if self.cache and self.doc:
            refuse("give one, not both", "cache", "doc")
        return self
