"""Answer metrics against values worked out by hand from their definitions."""

import pytest

from loramem.evaluation.metrics import exact_match, rouge_l, rouge_l_matched, score_answer, token_f1
from loramem.text import normalize_answer


def test_rouge_l_prefix_from_lcs() -> None:
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 3/3, R = 3/6, F = 2/3.
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)


def test_rouge_l_uses_order_not_bag_of_words() -> None:
    # Same three tokens reversed: LCS = 1, so P = R = F = 1/3.
    assert rouge_l("sat cat the", ["the cat sat"]) == pytest.approx(1 / 3)


def test_rouge_l_stems_but_squad_metrics_do_not() -> None:
    # Porter reduces both "running" and "runs" to "run"; EM/F1 compare surface tokens.
    assert rouge_l("running", ["runs"]) == 1.0
    assert exact_match("running", ["runs"]) == 0.0
    assert token_f1("running", ["runs"]) == 0.0


def test_rouge_l_takes_best_reference() -> None:
    # vs "dog": 0; vs "the cat sat on the mat": 2/3; vs "the cat sat": 1.
    assert rouge_l("the cat sat", ["dog", "the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l("the cat sat", ["dog", "the cat sat on the mat", "The cat sat."]) == 1.0


@pytest.mark.parametrize("prediction", ["", "   "])
def test_rouge_l_empty_prediction_is_zero_float(prediction: str) -> None:
    score = rouge_l(prediction, ["the cat"])
    assert score == 0.0
    assert isinstance(score, float)


def test_bare_string_is_one_reference_not_characters() -> None:
    # Scored character by character, "cat" would match the reference "c" exactly.
    assert exact_match("c", "cat") == 0.0
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)


@pytest.mark.parametrize("metric", [rouge_l, exact_match, token_f1, score_answer])
def test_no_references_is_an_error(metric) -> None:
    with pytest.raises(ValueError, match="reference"):
        metric("cat", [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple,\ta day ", "apple day"),
        ("theater", "theater"),  # articles only as whole words
        ("U.S.A.", "usa"),  # punctuation is deleted, not replaced by a space (SQuAD)
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_normalizes_and_takes_best_reference() -> None:
    assert exact_match("The Eiffel Tower!", ["Paris", "eiffel   tower"]) == 1.0
    assert exact_match("Eiffel Tower in Paris", ["eiffel tower"]) == 0.0


def test_token_f1_hand_computed() -> None:
    # Normalized: pred {cat, sat, on, mat}, ref {cat, sat, on, hat}: overlap 3, P = R = 3/4.
    assert token_f1("The cat sat on the mat.", ["a cat sat on a hat"]) == pytest.approx(0.75)


def test_token_f1_counts_repeated_tokens_once_per_match() -> None:
    # Overlap min(3, 1) = 1: P = 1/3, R = 1, F = 2 * (1/3) / (4/3) = 1/2.
    assert token_f1("cat cat cat", ["cat"]) == pytest.approx(0.5)


def test_token_f1_takes_best_reference() -> None:
    # vs "cat": P = 1/2, R = 1, F = 2/3; vs "black cat": 1.
    assert token_f1("black cat", ["cat", "dog"]) == pytest.approx(2 / 3)
    assert token_f1("black cat", ["cat", "Black cat!"]) == 1.0


def test_answers_that_normalize_to_nothing() -> None:
    # "a" and "The" both normalize to "": a match for EM and, consistently, for F1.
    assert exact_match("a", ["The"]) == 1.0
    assert token_f1("a", ["The"]) == 1.0
    assert token_f1("", ["cat"]) == 0.0
    assert token_f1("cat", ["the"]) == 0.0


def test_score_answer_combines_all_metrics() -> None:
    # ROUGE-L keeps "the": 6 vs 6 tokens, LCS "cat sat on" = 3, F = 1/2 (as long as the reference: matched alike).
    scores = score_answer("The cat sat on the mat.", ["a cat sat on a hat"])
    assert scores == pytest.approx(
        {"rouge_l": 0.5, "exact_match": 0.0, "token_f1": 0.75, "contains": 0.0, "rouge_l_matched": 0.5}
    )


def test_length_matched_rouge_l_scores_the_best_span_of_the_references_length() -> None:
    # A right answer in a sentence: ROUGE-L F = 2 * 2 / (7 + 2); its 2-token span "ansel marrow" matches whole.
    sentence = "The honey is collected by Ansel Marrow."
    assert rouge_l(sentence, ["Ansel Marrow"]) == pytest.approx(4 / 9)
    assert rouge_l_matched(sentence, ["Ansel Marrow"]) == 1.0
    # The best 2-token span of "marrow x ansel" holds one reference token: P = R = F = 1/2; ROUGE-L's LCS is also 1,
    # over 3 tokens: F = 2 * 1 / (3 + 2).
    assert rouge_l_matched("marrow x ansel", ["Ansel Marrow"]) == pytest.approx(1 / 2)
    assert rouge_l("marrow x ansel", ["Ansel Marrow"]) == pytest.approx(2 / 5)
    # Shorter than the reference: scored whole, as ROUGE-L scores it; stemmed as ROUGE-L is.
    for answer in ("Marrow", "ansel", "runs", "", "the cats running"):
        for ref in (["Ansel Marrow"], ["running cat"], ["a cat sat on a hat", "cats run"]):
            if len(answer.split()) <= min(len(r.split()) for r in ref):
                assert rouge_l_matched(answer, ref) == pytest.approx(rouge_l(answer, ref))
    # The reference's words spread over a long answer: ROUGE-L's LCS 2 over 5 tokens, F = 4 / 7; no 2-token span
    # holds both, F = 1/2. The reference is credited as a stretch of the answer, not as scattered words.
    assert rouge_l("ansel x x x marrow", ["Ansel Marrow"]) == pytest.approx(4 / 7)
    assert rouge_l_matched("ansel x x x marrow", ["Ansel Marrow"]) == pytest.approx(1 / 2)
    # Each reference with its own length: the best over references.
    assert rouge_l_matched("it was seven tunnels in all", ["eleven", "seven tunnels"]) == 1.0


def test_contains_credits_a_right_answer_given_at_length():
    from loramem.evaluation.metrics import contains, score_answer

    assert contains("The birth year of Gribel Vagon is 1635.", ["1635"]) == 1.0
    assert contains("Gribel was born in 16350.", ["1635"]) == 0.0  # whole words only
    assert contains("It was the Vafi Guild.", ["vafi guild", "no"]) == 1.0
    assert contains("anything", [""]) == 0.0
    assert score_answer("The year 1635", ["1635"])["contains"] == 1.0
