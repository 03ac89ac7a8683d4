"""Answer scoring for document QA: ROUGE-L plus SQuAD-style exact match and token F1.

Every metric takes the best score over the references, because a question can have
several equally correct gold answers and a prediction only has to match one of them.
"""

from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from loramem.text import normalize_answer, strip_thinking

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer
    from rouge_score.tokenizers import Tokenizer


@lru_cache(maxsize=1)
def _rouge_scorer() -> "RougeScorer":
    """Build the scorer on first use: importing rouge_score (nltk, absl) slows CLI start-up."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _reference_list(references: str | Sequence[str]) -> list[str]:
    """Treat a bare string as one reference, so it is not scored character by character."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is required")
    return refs


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """Best ROUGE-L F1 (LCS-based, Porter-stemmed) of `prediction` over `references`.

    rouge_score's tokenizer keeps only [a-z0-9] runs, so text without Latin letters or
    digits scores 0; an empty prediction scores 0.
    """
    scorer = _rouge_scorer()
    # float(): rouge_score returns the int 0 when either side has no tokens.
    return float(max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _reference_list(references)))


@lru_cache(maxsize=1)
def _tokenizer() -> "Tokenizer":
    """The tokens ROUGE-L compares: rouge_score's own tokenizer, Porter-stemmed as the scorer is."""
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_matched(prediction: str, references: str | Sequence[str]) -> float:
    """Best ROUGE-L F1 of the prediction's best span of each reference's length (in ROUGE tokens).

    ROUGE-L F1 falls as an answer grows, right or wrong, so a terse mode beats one that answers in sentences by
    style alone. Scored on its best stretch as long as the reference, an answer's extra words cost nothing
    wherever they are ("The honey is collected by Ansel Marrow." scores 1 against "Ansel Marrow"), so a margin
    under this metric is not one of answer length. An answer no longer than the reference is scored whole, as
    ROUGE-L scores it; reference words scattered over a long answer score less than under ROUGE-L (the reference
    is credited as a stretch of the answer).
    """
    tokens = _tokenizer().tokenize(prediction)
    best = 0.0
    for ref in _reference_list(references):
        target = _tokenizer().tokenize(ref)
        n = len(target)
        for start in range(max(1, len(tokens) - n + 1)):
            span = tokens[start : start + n]
            common = _lcs(span, target)
            if common:
                best = max(best, 2 * common / (len(span) + n))
    return best


def words(text: str) -> int:
    """An answer's or reference's length as the tables report it: whitespace-separated words."""
    return len(strip_thinking(text).split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized reference, else 0.0."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(ref)) for ref in _reference_list(references))


def _token_f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    """Bag-of-tokens F1; when either side is empty, 1.0 only if both are (SQuAD v2 rule,
    consistent with exact_match, e.g. prediction "a" vs reference "The")."""
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Best SQuAD token-overlap F1 of `prediction` over `references`."""
    pred_tokens = normalize_answer(prediction).split()
    return max(_token_f1(pred_tokens, normalize_answer(ref).split()) for ref in _reference_list(references))


def contains(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if any normalized reference occurs in the normalized prediction (as whole words), else 0.0.

    ROUGE-L and F1 punish a right answer given as a full sentence; a model (or adapter) that answers
    tersely then looks better than one that answers correctly at length. This metric does not.
    """
    pred = f" {normalize_answer(strip_thinking(prediction))} "
    return max(float(bool(ref) and f" {ref} " in pred) for ref in map(normalize_answer, _reference_list(references)))


def score_answer(prediction: str, references: str | Sequence[str]) -> dict[str, float]:
    """All answer metrics at once, keyed as they appear in evaluation tables; a think block is no part of the answer."""
    prediction = strip_thinking(prediction)
    return {
        "rouge_l": rouge_l(prediction, references),
        "exact_match": exact_match(prediction, references),
        "token_f1": token_f1(prediction, references),
        "contains": contains(prediction, references),
        "rouge_l_matched": rouge_l_matched(prediction, references),
    }
