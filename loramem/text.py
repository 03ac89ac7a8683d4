"""Text helpers that several layers share: answer normalization, sentence splitting, think blocks.

Kept at the bottom of the package (no loramem imports) so scoring (`evaluation.metrics`), QA synthesis
(`data.synth`) and chunking (`library.embed`) read text the same way without importing one another.
"""

import re
import string
from collections.abc import Callable

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
# A sentence ends at . ! ? (optionally closed by a quote or bracket) before a capital or digit, not after a title.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))(?<!\bDr\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bSt\.)(?<!\bMrs\.)"
    r"\s+(?=[\"'(\[]?[A-Z0-9])"
)
WORD = re.compile(r"[^\W_][\w'’-]*")
_MIN_WORDS = 3


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop ASCII punctuation and articles, collapse whitespace.

    Kept identical to the official SQuAD script so scores compare with published numbers.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def one_line(text: str) -> str:
    """The text on one line, each run of whitespace a single space: an answer as a line of output."""
    return " ".join(text.split())


def strip_thinking(text: str) -> str:
    """The answer without any <think>...</think> block (an unclosed one runs to the end): reasoning is not an
    answer, so it is removed before scoring."""
    return _THINK.sub("", text).strip() if "<think>" in text else text


def sentences(document: str) -> list[str]:
    """Sentences of the document; headings (lines without end punctuation) only when nothing else is there."""
    found = []
    for paragraph in re.split(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)])\s)", document):
        text = " ".join(paragraph.split())
        found += [s.strip() for s in _SENTENCE_END.split(text) if len(WORD.findall(s)) >= _MIN_WORDS]
    punctuated = [s for s in found if s[-1] in ".!?\"')"]
    return punctuated or found or [" ".join(document.split())]


class InOrder:
    """Pieces of several answers written in answer order as they come: the first unwritten answer's text at once, a
    later one's once every answer before it has ended (streamed answers: `ask --stream`, `chat`, `ask --server`)."""

    def __init__(self, count: int, write: Callable[[str], None]) -> None:
        self._pending = [""] * count
        self._done = [False] * count
        self._next = 0
        self._write = write
        self.mid_line = False  # a line was begun and not ended: what an interrupt leaves

    def add(self, index: int, text: str, *, ended: bool = False) -> None:
        """More of answer `index` (`ended`: its last piece, which ends its line)."""
        self._pending[index] += text
        self._done[index] = ended
        while self._next < len(self._pending):
            first = self._next
            if self._pending[first]:
                self._write(self._pending[first])
                self._pending[first] = ""
                self.mid_line = not self._done[first]
            if not self._done[first]:
                break
            self._next += 1
