"""How a document and a question are framed for the model, derived from its chat template.

The document is prefilled once; a question must later continue that exact token stream. So the
template is rendered once with sentinel strings and cut into pieces: the prefix before the
document, the separator before the question, the suffix that opens the answer, and the text
that ends an answer turn (used to stop generation and to end training targets).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from loramem.errors import IncompatibleArtifactError, LoramemError
from loramem.specs.base import refuse
from loramem.vocab import FRAMINGS

_DOC, _QUESTION, _ANSWER = "\x00LORAMEM_DOC\x00", "\x00LORAMEM_QUESTION\x00", "\x00LORAMEM_ANSWER\x00"
SEPARATOR = "\n\n"
# Asked before every question, with or without the document, so answers stay short and
# adapters are trained on exactly the prompt that `ask` sends.
INSTRUCTION = "Answer in a few words. "
DEFAULT_FRAMING = FRAMINGS[0]  # the model's chat template, for documents and closed-book questions alike
# The date a date-stamped template (Llama-3.2's strftime_now) is rendered with, so that a cache encoded on one day
# frames a question asked on another identically; Llama-3.x templates' own fallback date.
PINNED_DATE = "2024-07-26"
# apply_chat_template's own arguments: not template variables.
_RESERVED_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "chat_template",
        "tools",
        "documents",
        "return_dict",
        "return_tensors",
        "padding",
        "truncation",
        "max_length",
    }
)


@dataclass(frozen=True)
class TemplateOptions:
    """Variables the chat template is rendered with, recorded in every artifact so framings can be compared.

    `kwargs` go to the template as given (`--chat-template-kwargs`), with thinking switched off by default where
    the template takes `enable_thinking`; `date` is what the template's strftime_now returns (None when it has none).
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    date: str | None = None

    @classmethod
    def resolve(cls, tokenizer: Any, given: dict[str, Any] | None = None) -> TemplateOptions:
        """Check user kwargs against the tokenizer's template and add the defaults."""
        template = getattr(tokenizer, "chat_template", None) or ""
        template = template if isinstance(template, str) else json.dumps(template)
        kwargs = check_template_kwargs(given or {})
        if kwargs and not template:
            refuse("given, but this model's tokenizer has no chat template", "chat_template_kwargs")
        unused = [k for k in kwargs if k not in template]
        if unused:
            raise LoramemError(f"the chat template does not use {', '.join(map(repr, unused))}; check the spelling")
        if "enable_thinking" in template:
            kwargs.setdefault("enable_thinking", False)
        return cls(kwargs, PINNED_DATE if "strftime_now" in template else None)

    def render_kwargs(self) -> dict[str, Any]:
        if self.date is None:
            return dict(self.kwargs)
        pinned = date.fromisoformat(self.date)
        return {**self.kwargs, "strftime_now": pinned.strftime}

    def record(self) -> dict[str, str]:
        """As fingerprint entries (canonical JSON), beside the template's hash."""
        return {"chat_template_kwargs": json.dumps(self.kwargs, sort_keys=True), "chat_template_date": self.date or ""}


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """A JSON object of template variables, or a one-line error."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            refuse(f"not valid JSON ({exc.msg})", "chat_template_kwargs")
    if not isinstance(kwargs, dict):
        refuse("must be a JSON object, e.g. '{\"enable_thinking\": true}'", "chat_template_kwargs")
    reserved = sorted(set(kwargs) & _RESERVED_KWARGS)
    if reserved:
        refuse(f"cannot set {', '.join(reserved)}: loramem sets them itself", "chat_template_kwargs")
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as exc:
        refuse(f"must hold JSON values: {exc}", "chat_template_kwargs")
    return dict(kwargs)


def check_template_record(made: dict[str, Any], fingerprint: dict[str, str], source: str) -> None:
    """Refuse an artifact framed with other template variables or on another date than this run (artifacts from
    before these were recorded were framed with neither)."""
    had = made.get("chat_template_kwargs") or "{}"
    have = fingerprint.get("chat_template_kwargs") or "{}"
    if had != have:
        raise IncompatibleArtifactError(
            f"{source} was framed with chat-template kwargs {had}, this run with {have}; "
            f"pass --chat-template-kwargs '{had}' or re-make it"
        )
    had_date, have_date = made.get("chat_template_date") or "", fingerprint.get("chat_template_date") or ""
    if had_date != have_date:
        raise IncompatibleArtifactError(
            f"{source} was framed on template date {had_date or 'none'}, this run on {have_date or 'none'}; re-make it"
        )


@dataclass(frozen=True)
class Framing:
    """Text pieces around the document and the question; recorded in every cache."""

    style: str
    prefix: str
    separator: str
    instruction: str
    suffix: str
    end_of_turn: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Framing:
        return cls(**{k: data[k] for k in ("style", "prefix", "separator", "instruction", "suffix", "end_of_turn")})

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, style: str = DEFAULT_FRAMING, template: TemplateOptions | None = None
    ) -> Framing:
        """Chat framing from the tokenizer's template rendered with `template` (default: resolved from the
        template itself), or plain text when it has none."""
        if style not in FRAMINGS:
            raise LoramemError(f"unknown framing {style!r}; use one of {', '.join(FRAMINGS)}")
        eos = tokenizer.eos_token or ""
        if style == "raw" or not getattr(tokenizer, "chat_template", None):
            return cls("raw", "", SEPARATOR, INSTRUCTION + "Question: ", "\nAnswer:", eos)
        from jinja2 import TemplateError

        variables = (template or TemplateOptions.resolve(tokenizer)).render_kwargs()
        try:
            asked = tokenizer.apply_chat_template(
                [{"role": "user", "content": _DOC + SEPARATOR + _QUESTION}],
                tokenize=False,
                add_generation_prompt=True,
                **variables,
            )
            answered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _QUESTION}, {"role": "assistant", "content": _ANSWER}],
                tokenize=False,
                **variables,
            )
        except (TemplateError, TypeError, ValueError) as exc:  # the template's raise_exception raises TemplateError
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            refuse(f"this model's chat template cannot frame a question ({reason}); use raw", "framing")
        # A document and a question must pass through the template unchanged, each exactly once, so that a question
        # continues a stored prefill token for token: a template that rewrites, cuts or repeats them cannot be used.
        if asked.count(_DOC) != 1 or asked.count(_QUESTION) != 1 or answered.count(_ANSWER) != 1:
            refuse(
                "this model's chat template rewrites or repeats the message text, so a stored document cannot be "
                "continued by a question; use raw",
                "framing",
            )
        prefix, rest = asked.split(_DOC)
        if _QUESTION not in rest:
            refuse("this model's chat template puts the question before the document; use raw", "framing")
        separator, suffix = rest.split(_QUESTION)
        end_of_turn = answered.split(_ANSWER)[1] or eos
        return cls("chat", prefix, separator, INSTRUCTION, suffix, end_of_turn)


def _text_ids(tokenizer: Any, text: str, *, trusted: bool) -> list[int]:
    """Token ids; user text is tokenized with special-token strings split, so it cannot inject turns."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=not trusted)["input_ids"])


def prefix_ids(tokenizer: Any, framing: Framing) -> list[int]:
    return _text_ids(tokenizer, framing.prefix, trusted=True)


def document_ids(tokenizer: Any, document: str) -> list[int]:
    return _text_ids(tokenizer, document, trusted=False)


def question_ids(tokenizer: Any, framing: Framing, question: str, *, after_document: bool) -> list[int]:
    """The tokens that follow a document (or the bare prefix, closed-book) and open the answer."""
    lead = framing.separator if after_document else ""
    return _text_ids(tokenizer, lead + framing.instruction + question, trusted=False) + _text_ids(
        tokenizer, framing.suffix, trusted=True
    )


def closed_book_ids(tokenizer: Any, framing: Framing, question: str) -> list[int]:
    """The whole prompt for a question asked with no document: what adapters are trained on."""
    return prefix_ids(tokenizer, framing) + question_ids(tokenizer, framing, question, after_document=False)


def answer_ids(tokenizer: Any, framing: Framing, answer: str) -> list[int]:
    """An answer as a training target, ending exactly as the template ends a turn."""
    return _text_ids(tokenizer, answer, trusted=False) + end_of_turn_ids(tokenizer, framing)[:1]


def end_of_turn_ids(tokenizer: Any, framing: Framing) -> list[int]:
    return _text_ids(tokenizer, framing.end_of_turn, trusted=True)


def stop_token_ids(tokenizer: Any, framing: Framing, generation_config: Any = None) -> set[int]:
    """Tokens that end an answer: the template's end-of-turn token and the model's EOS ids."""
    stops = set(end_of_turn_ids(tokenizer, framing)[:1])
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            stops.add(source)
        elif source:
            stops.update(int(s) for s in source)
    return stops


def common_prefix(sequences: list[list[int]], most: int) -> int:
    """How many leading tokens every sequence shares, at most `most`: the tokens a batch can compute once (the
    answering engine's shared lead, training's shared prefix)."""
    first, lead = sequences[0], 0
    while lead < most and all(len(s) > lead and s[lead] == first[lead] for s in sequences):
        lead += 1
    return lead
