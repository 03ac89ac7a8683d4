"""Question-answer pairs made from a document, for training an adapter when no QA file is given.

Two sources: a model, asked per passage and kept only where the answer is found in the passage (a
small model invents a lot), and deterministic rules (cloze and entity questions) that work on any
text and top the set up to the size asked for. The model is the one being trained unless another,
stronger one is named (`--synth-model`, as the paper writes its QA with a strong model); every pair
records who wrote it: the writer's model id, or "rules".
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable

from loramem.answer import answer_batch
from loramem.errors import LoramemError
from loramem.log import log
from loramem.model import MAX_BATCH
from loramem.model.loading import LoadedModel, load_model
from loramem.specs.base import refuse
from loramem.text import WORD, normalize_answer, sentences, strip_thinking

QA = tuple[str, str]
SOURCES = ("model", "rule")
RULES = "rules"  # written_by of rule-made pairs
_writers: dict[tuple[str, str, str], LoadedModel] = {}  # a --synth-model is loaded once per process
_STOPWORDS = frozenset(
    (
        "a an the and or but if of in on at to for from by with as is are was were be been it its he she his "
        "her they their them this that these those there here when while after before during each every today "
        "then also not no so such which who whom what where why how i we you our your my me us one"
    ).split()
)
_NUMBER_WORD = (
    r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
    r"sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|"
    r"hundred|thousand|million)"
)
_NUMBER_WORDS = re.compile(rf"\b{_NUMBER_WORD}(?:(?:[- ]|\sand\s){_NUMBER_WORD})*\b", re.IGNORECASE)
_NUMBER = re.compile(r"\b\d(?:[\d,.:]*\d)?\b")
_CAPITAL = r"[A-Z][\w'’-]*"
_CAPITALIZED = re.compile(rf"{_CAPITAL}(?:\s+(?:(?:of|the|de|la|van|von|and|&)\s+)?{_CAPITAL})*")
_YEAR = re.compile(r"1\d{3}|20\d{2}")
_PASSAGE_WORDS = 70
_PAIRS_PER_PASSAGE = 4
_MAX_ANSWER_WORDS = 12
_Q_LINE = re.compile(
    r"^[\W\d]*Q(?:uestion)?\s*\d*\s*[:.]\s*(?P<q>.+?\?)\s*(?:A(?:nswer)?\s*\d*\s*[:.]\s*(?P<a>.*))?$", re.IGNORECASE
)
_A_LINE = re.compile(r"^[\W\d]*A(?:nswer)?\s*\d*\s*[:.]\s*(?P<a>.+)$", re.IGNORECASE)


def dedupe(pairs: Iterable[QA]) -> list[QA]:
    """Pairs with the first of each normalized question kept, in order."""
    seen: dict[str, QA] = {}
    for question, answer in pairs:
        seen.setdefault(normalize_answer(question), (question, answer))
    return list(seen.values())


def _strip_leading_stopwords(phrase: str) -> str:
    words = phrase.split()
    while words and words[0].lower() in _STOPWORDS:
        words.pop(0)
    return " ".join(words)


def spans(sentence: str) -> list[str]:
    """What a question can ask for: capitalized phrases, numbers and number words, else the longest word."""
    found = []
    for match in _CAPITALIZED.finditer(sentence):
        phrase = _strip_leading_stopwords(match.group())
        if phrase and (match.start() > 0 or " " in phrase or phrase != match.group()):
            found.append(phrase)
    found += [m.group() for m in _NUMBER.finditer(sentence)]
    found += [m.group() for m in _NUMBER_WORDS.finditer(sentence) if m.group().lower() != "one"]
    if not found:
        content = [w for w in WORD.findall(sentence) if w.lower() not in _STOPWORDS]
        found = sorted(content, key=len, reverse=True)[:1] or WORD.findall(sentence)[:1]
    return list(dict.fromkeys(s.strip(" -'’") for s in found if s.strip(" -'’")))


def _entity_question(span: str) -> str:
    if _YEAR.fullmatch(span):
        return f"What happened in {span}, according to the document?"
    if _NUMBER.fullmatch(span) or _NUMBER_WORDS.fullmatch(span):
        return f"What does the number {span} refer to in the document?"
    return f"Who or what is {span}, according to the document?"


def _sentence_pairs(sentence: str, topics_used: set[str]) -> list[QA]:
    """Cloze and entity questions on each span of one sentence, and one "what does it say about" question.

    Entity and topic questions are answered with the whole sentence: they are paraphrases that ask
    for the same fact, which helps an adapter answer questions worded unlike its training pairs.
    """
    pairs = []
    found = spans(sentence)
    for span in found:
        pairs.append((f"Fill in the blank: {sentence.replace(span, '___', 1)}", span))
        if span != sentence:
            pairs.append((_entity_question(span), sentence))
    topic = next((s for s in found if normalize_answer(s) not in topics_used and s != sentence), None)
    if topic is not None:
        topics_used.add(normalize_answer(topic))
        pairs.append((f"What does the document say about {topic}?", sentence))
    return pairs


def rule_qa(document: str, n: int, seed: int = 0) -> list[QA]:
    """Up to n deterministic pairs, taken round-robin over sentences so the whole document is covered."""
    rng = random.Random(seed)
    topics_used: set[str] = set()
    per_sentence = []
    for sentence in sentences(document):
        pairs = _sentence_pairs(sentence, topics_used)
        rng.shuffle(pairs)
        per_sentence.append(pairs)
    ordered = [p[i] for i in range(max(map(len, per_sentence), default=0)) for p in per_sentence if i < len(p)]
    return dedupe(ordered)[: max(n, 0)]


def passages(document: str, words: int = _PASSAGE_WORDS) -> list[str]:
    """The document as consecutive passages of about `words` words, cut at sentence ends."""
    chunks: list[str] = []
    current: list[str] = []
    for sentence in sentences(document):
        if current and len(" ".join([*current, sentence]).split()) > words:
            chunks.append(" ".join(current))
            current = []
        current.append(sentence)
    return chunks + ([" ".join(current)] if current else [])


def _prompt(passage: str, k: int) -> str:
    """The wording that got SmolLM2-135M to write parseable pairs most often (text first, a format sketch)."""
    return (
        f"Text:\n{passage}\n\nWrite {k} questions about this text with short answers. "
        "Format:\nQ: Who ...?\nA: ...\nQ: When ...?\nA: ..."
    )


def parse_pairs(text: str) -> list[QA]:
    """ "Q: ... A: ..." pairs from model output, on one line or a Q line followed by an A line."""
    pairs, pending = [], None
    for line in text.splitlines():
        q_match, a_match = _Q_LINE.match(line), _A_LINE.match(line)
        if q_match:
            pending = q_match["q"].strip()
            if q_match["a"]:
                pairs.append((pending, q_match["a"]))
                pending = None
        elif a_match and pending:
            pairs.append((pending, a_match["a"]))
            pending = None
    return [(q, a.strip().rstrip(".").strip()) for q, a in pairs]


def trim_restated(question: str, answer: str) -> str:
    """The answer without the leading words that repeat the question ("The tower was built in 1871" -> "in 1871")."""
    asked = set(normalize_answer(question).split())
    words = answer.split()
    while words and set(normalize_answer(words[0]).split()) <= asked:
        words.pop(0)
    return " ".join(words) or answer


def supported(question: str, answer: str, passage: str) -> bool:
    """A short answer whose words all occur in the passage and not all in the question itself."""
    words = normalize_answer(answer).split()
    if not words or len(words) > _MAX_ANSWER_WORDS or len(normalize_answer(question).split()) < 3:
        return False
    return set(words) <= set(normalize_answer(passage).split()) and not set(words) <= set(
        normalize_answer(question).split()
    )


def model_qa(lm: LoadedModel, document: str, n: int, seed: int = 0) -> list[QA]:
    """Up to n pairs the model writes about its own passages, kept only where the passage supports the answer.

    Greedy decoding makes this deterministic; the seed picks the order in which passages are asked,
    and at most n passages are asked so a model that writes nothing usable costs bounded time. Passages are asked
    in batches (`answer_batch`, left-padded, no shared cache) and read in order, giving the pairs of asking one at
    a time: a passage is asked for min(4, pairs still missing) pairs, and where that number changes partway through
    a batch, the passages after it are asked again with the new number.
    """
    chosen = passages(document)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[: max(n, 0)]
    plain = dataclasses.replace(lm.framing(), instruction="")
    pairs: list[QA] = []
    asked = 0
    while asked < len(chosen) and len(pairs) < n:
        k = min(_PAIRS_PER_PASSAGE, n - len(pairs))
        wave = chosen[asked : asked + MAX_BATCH]
        # The prompt is the whole request: without the closed-book "Answer in a few words." in front of it.
        replies = answer_batch(lm, [_prompt(p, k) for p in wave], None, max_new_tokens=30 * k, framing=plain)
        for passage, reply in zip(wave, replies):
            asked += 1
            found = [(q, trim_restated(q, a)) for q, a in parse_pairs(strip_thinking(reply.answer))]
            pairs = dedupe(pairs + [(q, a) for q, a in found if supported(q, a, passage)])
            if len(pairs) >= n or min(_PAIRS_PER_PASSAGE, n - len(pairs)) != k:
                break
    return pairs[: max(n, 0)]


def synth_writer(name: str | None, lm: LoadedModel) -> LoadedModel:
    """The model that writes QA pairs: `lm` itself, or model `name` (any id or local directory) loaded once per
    process on `lm`'s device and in its dtype."""
    if not name:
        return lm
    key = (name, str(lm.device), str(lm.dtype).removeprefix("torch."))
    if key not in _writers:
        log(f"loading {name} to write the QA pairs")
        _writers[key] = load_model(name, device=key[1], dtype=key[2])
    return _writers[key]


def check_synth_request(fmt: str, synth_model: str | None, pairs_given: bool) -> None:
    """A writer model is only for what gets written: QA pairs of formats qa and mixed when no pairs are given, and
    mixed's views of the document."""
    if synth_model and (fmt == "ntp" or (pairs_given and fmt != "mixed")):
        refuse("writes the QA pairs of formats qa and mixed when no pairs are given, and mixed's views", "synth.model")


def training_pairs(
    lm: LoadedModel,
    text: str,
    fmt: str,
    given: list[QA] | None,
    n: int,
    seed: int = 0,
    synth_model: str | None = None,
) -> tuple[list[QA], list[str] | None]:
    """The one rule for the pairs a document's adapter trains on: none for ntp, else the given pairs, else n pairs
    synthesized (by `synth_model`, else `lm`, topped up by rules); and who wrote each synthesized pair. Commands
    with one document refuse a `synth_model` that would go unused (check_synth_request); an eval uses it for the
    documents that come without pairs."""
    if fmt == "ntp":
        return [], None
    if given is not None:
        return given, None
    return synthesize_pairs(synth_writer(synth_model, lm), text, n, seed)


def synthesize_pairs(
    writer: LoadedModel | None, document: str, n: int, seed: int = 0, sources: Iterable[str] = SOURCES
) -> tuple[list[QA], list[str]]:
    """n training pairs, the writer model's first, topped up with rule-based ones; and who wrote each (the writer's
    model id or "rules")."""
    sources = tuple(sources)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise LoramemError(f"unknown QA source {unknown[0]!r}; use {' or '.join(SOURCES)}")
    if n < 1:
        raise LoramemError(f"the number of pairs to synthesize must be at least 1, got {n}")
    if not document.strip():
        raise LoramemError("the document is empty; nothing to make questions from")
    if "model" in sources and writer is None:
        raise LoramemError("model-written pairs need a model")
    pairs = model_qa(writer, document, n, seed) if "model" in sources and writer is not None else []
    from_model = len(pairs)
    if "rule" in sources:
        pairs = dedupe(pairs + rule_qa(document, n + from_model, seed))
    pairs, by_model = pairs[:n], min(from_model, n)
    name = writer.model_id if writer is not None else RULES
    log(f"synthesized {len(pairs)} pairs ({by_model} written by {name}, the rest by rules)")
    return pairs, [name] * by_model + [RULES] * (len(pairs) - by_model)


def synthesize(
    lm: LoadedModel | None, document: str, n: int, seed: int = 0, sources: Iterable[str] = SOURCES
) -> list[QA]:
    """n training pairs: the model's own first, topped up with rule-based ones."""
    return synthesize_pairs(lm, document, n, seed, sources)[0]
