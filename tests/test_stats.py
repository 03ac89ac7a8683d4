"""Evaluation statistics against closed forms, a textbook example and scipy."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from loramem.evaluation.stats import (
    cluster_bootstrap_mean,
    mean_ci,
    paired_bootstrap,
    paired_cluster_bootstrap,
    paired_t_test,
)

# Student's sleep data (Cushny & Peebles; R's `sleep`): extra hours of sleep per patient.
SLEEP_DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def t_quantile_df2(p: float) -> float:
    """Closed-form Student-t quantile for 2 degrees of freedom, independent of scipy."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def test_mean_ci_hand_computed_t_interval() -> None:
    # [1, 2, 3]: mean 2, sd 1, n 3, df 2: half-width = t_0.975,2 * 1 / sqrt(3) ~ 2.4841.
    half = t_quantile_df2(0.975) / math.sqrt(3)
    mean, low, high = mean_ci([1, 2, 3])
    assert mean == 2.0
    assert (low, high) == pytest.approx((2 - half, 2 + half))
    assert half == pytest.approx(2.4841377, abs=1e-6)


def test_mean_ci_widens_with_confidence() -> None:
    _, low95, high95 = mean_ci([1, 2, 3, 5], confidence=0.95)
    _, low99, high99 = mean_ci([1, 2, 3, 5], confidence=0.99)
    assert low99 < low95 < high95 < high99


def test_mean_ci_constant_values_have_zero_width() -> None:
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_mean_ci_single_value_has_undetermined_bounds() -> None:
    mean, low, high = mean_ci([0.7])
    assert mean == 0.7
    assert math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(
    ("values", "confidence"),
    [([], 0.95), ([1.0, math.nan], 0.95), ([[1.0, 2.0]], 0.95), ([1.0, 2.0], 1.0), ([1.0, 2.0], 0.0)],
)
def test_mean_ci_rejects_bad_input(values: list, confidence: float) -> None:
    with pytest.raises(ValueError):
        mean_ci(values, confidence=confidence)


def test_paired_t_test_hand_computed() -> None:
    # d = [1, 2, 3]: t = 2 / (1 / sqrt 3) = 2 sqrt 3; for df 2 the two-sided p is 1 - t / sqrt(2 + t^2).
    t = 2 * math.sqrt(3)
    half = t_quantile_df2(0.975) / math.sqrt(3)
    result = paired_t_test([1, 1, 1], [2, 3, 4])
    assert result["n"] == 3
    assert result["diff"] == 2.0
    assert result["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert (result["low"], result["high"]) == pytest.approx((2 - half, 2 + half))


def test_paired_t_test_textbook_sleep_data() -> None:
    # R: t.test(extra ~ group, data = sleep, paired = TRUE) reports t = -4.0621, df = 9,
    # p = 0.002833, 95% CI of group1 - group2 = (-2.4598858, -0.7001142), mean diff -1.58.
    result = paired_t_test(SLEEP_DRUG_1, SLEEP_DRUG_2)
    assert result["diff"] == pytest.approx(1.58)
    assert result["low"] == pytest.approx(0.7001142, abs=1e-7)
    assert result["high"] == pytest.approx(2.4598858, abs=1e-7)
    assert result["p_value"] == pytest.approx(0.002833, abs=5e-7)


def test_paired_t_test_matches_scipy() -> None:
    a = [0.61, 0.42, 0.77, 0.50, 0.38, 0.69]
    b = [0.66, 0.40, 0.81, 0.58, 0.45, 0.70]
    expected = sps.ttest_rel(b, a)
    ci = expected.confidence_interval(confidence_level=0.9)
    result = paired_t_test(a, b, confidence=0.9)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    assert (result["low"], result["high"]) == pytest.approx((ci.low, ci.high))
    assert result["diff"] == pytest.approx(float(np.mean(np.subtract(b, a))))


@pytest.mark.filterwarnings("error")
def test_paired_t_test_zero_variance_without_warnings() -> None:
    a = np.array([0.1, 0.2, 0.3])
    # a + 0.1 differs from a by 0.1 only up to rounding, where scipy would warn.
    shifted = paired_t_test(a, a + 0.1)
    assert shifted["p_value"] == 0.0
    assert shifted["low"] == shifted["high"] == shifted["diff"] == pytest.approx(0.1)
    same = paired_t_test(a, a)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "n": 3}


@pytest.mark.parametrize("test", [paired_t_test, paired_bootstrap])
def test_single_pair_has_undetermined_uncertainty(test) -> None:
    result = test([0.2], [0.5])
    assert result["diff"] == pytest.approx(0.3)
    assert result["n"] == 1
    assert all(math.isnan(result[key]) for key in ("low", "high", "p_value"))


@pytest.mark.parametrize("test", [paired_t_test, paired_bootstrap])
def test_paired_inputs_must_align(test) -> None:
    with pytest.raises(ValueError, match="length"):
        test([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        test([], [])


def test_bootstrap_clear_improvement() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 0.1, size=200)
    b = a + 0.3 + rng.normal(0.0, 0.1, size=200)  # true mean difference 0.3
    result = paired_bootstrap(a, b, n_resamples=2000)
    assert result["n"] == 200
    assert result["low"] < 0.3 < result["high"]
    assert result["low"] < result["diff"] < result["high"]
    # No resampled mean lies as far from the centre as 0.3, so p hits its floor 1 / (B + 1).
    assert result["p_value"] == pytest.approx(1 / 2001)


def test_bootstrap_interval_close_to_t_interval() -> None:
    # For 200 roughly normal differences the percentile and t intervals nearly coincide.
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=200)
    b = a + rng.normal(0.1, 1.0, size=200)
    boot = paired_bootstrap(a, b, n_resamples=4000)
    t = paired_t_test(a, b)
    width = t["high"] - t["low"]
    assert boot["diff"] == pytest.approx(t["diff"])
    assert boot["low"] == pytest.approx(t["low"], abs=0.1 * width)
    assert boot["high"] == pytest.approx(t["high"], abs=0.1 * width)
    assert boot["p_value"] == pytest.approx(t["p_value"], abs=0.05)


def test_bootstrap_identical_systems() -> None:
    scores = [0.1, 0.4, 0.9, 0.3]
    assert paired_bootstrap(scores, scores, n_resamples=500) == {
        "diff": 0.0,
        "low": 0.0,
        "high": 0.0,
        "p_value": 1.0,
        "n": 4,
    }


def test_bootstrap_no_effect_gives_large_p() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.5, 0.2, size=50)
    b = a + rng.normal(0.0, 0.2, size=50)
    result = paired_bootstrap(a, b, n_resamples=2000)
    assert result["low"] < 0.0 < result["high"]
    assert result["p_value"] > 0.2


def test_bootstrap_deterministic_for_seed() -> None:
    a = [0.2, 0.5, 0.4, 0.9, 0.1, 0.6]
    b = [0.3, 0.4, 0.6, 0.9, 0.3, 0.8]
    first = paired_bootstrap(a, b, n_resamples=1000, seed=7)
    assert paired_bootstrap(a, b, n_resamples=1000, seed=7) == first
    other = paired_bootstrap(a, b, n_resamples=1000, seed=8)
    assert (other["low"], other["high"], other["p_value"]) != (first["low"], first["high"], first["p_value"])


def test_bootstrap_long_input_resamples_in_chunks() -> None:
    # 3000 items force several index chunks; the p-value must still count all B resamples.
    d = np.linspace(-1.0, 1.0, 3000) + 0.02
    result = paired_bootstrap(np.zeros_like(d), d, n_resamples=1500)
    count = result["p_value"] * 1501 - 1
    assert count == pytest.approx(round(count)) and 0 <= round(count) <= 1500
    assert result["low"] < 0.02 < result["high"]


def test_bootstrap_rejects_no_resamples() -> None:
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap([1.0, 2.0], [2.0, 3.0], n_resamples=0)


# --- document-clustered bootstrap ----------------------------------------------------------------------------------


def test_cluster_bootstrap_two_documents_by_hand() -> None:
    """Two documents of two questions (means 0.6 and 0.65): a resample is (d0, d0) 0.6, (d1, d1) 0.65 or mixed
    0.625, each pair with probability 1/4, 1/4, 1/2; the 2.5% and 97.5% quantiles are exactly 0.6 and 0.65."""
    mean, low, high = cluster_bootstrap_mean([0.5, 0.7, 0.4, 0.9], ["d0", "d0", "d1", "d1"])
    assert (mean, low, high) == pytest.approx((0.625, 0.6, 0.65))
    result = paired_cluster_bootstrap([0.0] * 4, [0.5, 0.7, 0.4, 0.9], ["d0", "d0", "d1", "d1"])
    assert (result["low"], result["high"], result["n"], result["n_clusters"]) == pytest.approx((0.6, 0.65, 4, 2))


def test_one_question_per_document_is_the_question_bootstrap() -> None:
    """Every question its own document: the same resamples as the question-level bootstrap (same seed)."""
    a, b = SLEEP_DRUG_1, SLEEP_DRUG_2
    clustered = paired_cluster_bootstrap(a, b, list(range(len(a))), n_resamples=2000, seed=3)
    plain = paired_bootstrap(a, b, n_resamples=2000, seed=3)
    assert {k: clustered[k] for k in plain} == pytest.approx(plain)


def test_documents_that_differ_widen_the_interval() -> None:
    """Ten documents whose questions share a document effect: resampling questions as if independent gives an
    interval far narrower than resampling documents."""
    rng = np.random.default_rng(0)
    docs = np.repeat(np.arange(10), 30)
    values = rng.normal(0, 1, 10)[docs] + rng.normal(0, 0.1, docs.size)
    mean, low, high = cluster_bootstrap_mean(values, docs.tolist(), n_resamples=4000)
    _, q_low, q_high = mean_ci(values)
    assert mean == pytest.approx(values.mean())
    assert high - low > 3 * (q_high - q_low)


def test_a_gain_in_one_document_is_not_significant_by_documents() -> None:
    """All of the gain comes from one of two documents: significant over 40 'independent' questions, not over 2
    documents (p well above 0.05: half the resamples hold the document without gain or only the one with)."""
    base = [0.0] * 40
    adapted = [1.0] * 20 + [0.0] * 20
    docs = ["gain"] * 20 + ["none"] * 20
    assert paired_bootstrap(base, adapted)["p_value"] < 0.001
    assert paired_cluster_bootstrap(base, adapted, docs)["p_value"] > 0.2


def test_cluster_bootstrap_edge_cases() -> None:
    assert all(math.isnan(x) for x in cluster_bootstrap_mean([1.0, 2.0], ["d", "d"])[1:])
    single = paired_cluster_bootstrap([0.0, 0.0], [1.0, 0.5], ["d", "d"])
    assert single["diff"] == 0.75 and math.isnan(single["p_value"]) and single["n_clusters"] == 1
    with pytest.raises(ValueError, match="labels"):
        cluster_bootstrap_mean([1.0, 2.0], ["d"])
    with pytest.raises(ValueError, match="n_resamples"):
        cluster_bootstrap_mean([1.0, 2.0], ["a", "b"], n_resamples=0)
    assert cluster_bootstrap_mean([1.0, 2.0, 3.0], ["a", "b", "a"], seed=5) == cluster_bootstrap_mean(
        [1.0, 2.0, 3.0], ["a", "b", "a"], seed=5
    )
