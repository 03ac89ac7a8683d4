"""How a document and a question are framed for the model, derived from its chat template.

The document is prefilled once; a question must later continue that exact token stream. So the
template is rendered once with sentinel strings and cut into pieces: the prefix before the
document, the separator before the question, the suffix that opens the answer, and the text
that ends an answer turn (used to stop generation and to end training targets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loramem.errors import LoramemError

_DOC, _QUESTION, _ANSWER = "\x00LORAMEM_DOC\x00", "\x00LORAMEM_QUESTION\x00", "\x00LORAMEM_ANSWER\x00"
SEPARATOR = "\n\n"
# Asked before every question, with or without the document, so answers stay short and
# adapters are trained on exactly the prompt that `ask` sends.
INSTRUCTION = "Answer in a few words. "
FRAMINGS = ("chat", "raw")


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
    def for_tokenizer(cls, tokenizer: Any, style: str = "chat") -> Framing:
        """Chat framing from the tokenizer's template, or plain text when it has none."""
        if style not in FRAMINGS:
            raise LoramemError(f"unknown framing {style!r}; use one of {', '.join(FRAMINGS)}")
        eos = tokenizer.eos_token or ""
        if style == "raw" or not getattr(tokenizer, "chat_template", None):
            return cls("raw", "", SEPARATOR, INSTRUCTION + "Question: ", "\nAnswer:", eos)
        asked = tokenizer.apply_chat_template(
            [{"role": "user", "content": _DOC + SEPARATOR + _QUESTION}],
            tokenize=False,
            add_generation_prompt=True,
        )
        answered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _QUESTION}, {"role": "assistant", "content": _ANSWER}],
            tokenize=False,
        )
        prefix, rest = asked.split(_DOC)
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
