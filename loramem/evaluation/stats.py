"""Confidence intervals and paired significance tests for evaluation tables.

Results are plain Python floats so they serialize to JSON without conversion. With a
single observation the interval bounds and p-values are NaN rather than an error, so a
one-document smoke run still renders a table; a zero-width interval would claim a
certainty that one sample cannot give.
"""

import math
from collections.abc import Sequence

import numpy as np

# Elements of random index matrix drawn per bootstrap chunk; bounds memory for long inputs.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 20


def _as_vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """Validate once here so every statistic fails with the same clear message."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_confidence(confidence: float) -> None:
    """Reject levels outside (0, 1), which would silently give NaN quantiles."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (a, b); pairing is per item, so the lengths must agree."""
    a_arr, b_arr = _as_vector(a, "a"), _as_vector(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples differ in length: {a_arr.size} vs {b_arr.size}")
    return a_arr, b_arr


def _undetermined(diff: float, n: int) -> dict[str, float | int]:
    """Result for a single pair: the difference is known, its uncertainty is not."""
    return {"diff": diff, "low": math.nan, "high": math.nan, "p_value": math.nan, "n": n}


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) with a Student-t interval, which stays honest for the few documents
    a typical evaluation has. n=1 gives (x, nan, nan); n=0 raises ValueError."""
    _check_confidence(confidence)
    arr = _as_vector(values, "values")
    mean = float(arr.mean())
    n = arr.size
    if n == 1:
        return mean, math.nan, math.nan
    from scipy import stats as sps  # here: scipy.stats takes 0.6 s to import, and Ray workers never summarize

    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * float(arr.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float | int]:
    """Paired bootstrap of mean(b - a), free of the t-test's normality assumption.

    low/high is the percentile interval of the resampled means. p_value is two-sided by the
    shift method: the bootstrap distribution is centred on zero (the null) and p is the share
    of centred means at least as far from zero as the observed diff, with the +1 correction
    (count + 1) / (n_resamples + 1) so it is never exactly 0. Identical inputs give p = 1.
    The same seed, inputs and n_resamples always give the same result.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    a_arr, b_arr = _paired(a, b)
    d = b_arr - a_arr
    n = d.size
    diff = float(d.mean())
    if n == 1:
        return _undetermined(diff, n)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    boot = np.concatenate(
        [
            d[rng.integers(0, n, size=(min(chunk, n_resamples - start), n))].mean(axis=1)
            for start in range(0, n_resamples, chunk)
        ]
    )
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.count_nonzero(np.abs(boot - diff) >= abs(diff)))
    p_value = (extreme + 1) / (n_resamples + 1)
    return {"diff": diff, "low": float(low), "high": float(high), "p_value": p_value, "n": n}


def paired_t_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
) -> dict[str, float | int]:
    """Paired t-test of mean(b - a) via scipy.stats.ttest_rel, with its t confidence interval.

    When all differences are equal (up to the rounding at which scipy warns about
    catastrophic cancellation) the t statistic is undefined, so the result is decided
    directly: low = high = diff, p = 1.0 if diff == 0 else 0.0.
    """
    _check_confidence(confidence)
    a_arr, b_arr = _paired(a, b)
    d = b_arr - a_arr
    n = d.size
    diff = float(d.mean())
    if n == 1:
        return _undetermined(diff, n)
    if float(np.max(np.abs(d - diff))) <= 10 * np.finfo(float).eps * abs(diff):
        return {"diff": diff, "low": diff, "high": diff, "p_value": 1.0 if diff == 0 else 0.0, "n": n}
    from scipy import stats as sps

    result = sps.ttest_rel(b_arr, a_arr)
    ci = result.confidence_interval(confidence_level=confidence)
    return {
        "diff": diff,
        "low": float(ci.low),
        "high": float(ci.high),
        "p_value": float(result.pvalue),
        "n": n,
    }


def _clusters(values: np.ndarray, clusters: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and sizes of `values`, clusters in order of first appearance."""
    if len(clusters) != values.size:
        raise ValueError(f"clusters has {len(clusters)} labels for {values.size} values")
    index: dict[object, int] = {}
    labels = np.fromiter((index.setdefault(c, len(index)) for c in clusters), dtype=np.int64, count=values.size)
    return np.bincount(labels, weights=values), np.bincount(labels).astype(float)


def _resampled_means(sums: np.ndarray, sizes: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means over all items of k clusters drawn with replacement (k = the number of clusters), per resample."""
    rng = np.random.default_rng(seed)
    k = sums.size
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // k)
    parts = []
    for start in range(0, n_resamples, chunk):
        drawn = rng.integers(0, k, size=(min(chunk, n_resamples - start), k))
        parts.append(sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1))
    return np.concatenate(parts)


def cluster_bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[object],
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over all items with a percentile interval that resamples whole clusters.

    Questions are nested in documents: questions of one document share its difficulty, so resampling questions as
    if independent understates the uncertainty. Each resample draws as many documents as there are, with
    replacement, and takes the mean over all their questions (documents weigh by their number of questions, as in
    the point estimate). One cluster gives (mean, nan, nan): nothing varies between documents to resample.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    arr = _as_vector(values, "values")
    sums, sizes = _clusters(arr, clusters)
    mean = float(arr.mean())
    if sums.size == 1:
        return mean, math.nan, math.nan
    boot = _resampled_means(sums, sizes, n_resamples, seed)
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return mean, float(low), float(high)


def paired_cluster_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    clusters: Sequence[object],
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float | int]:
    """`paired_bootstrap` of mean(b - a) resampling whole clusters (documents) instead of items (questions).

    Same percentile interval and shift-method two-sided p-value; `n` items in `n_clusters` clusters. One cluster
    leaves the uncertainty undetermined (nan).
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    a_arr, b_arr = _paired(a, b)
    d = b_arr - a_arr
    sums, sizes = _clusters(d, clusters)
    diff = float(d.mean())
    if sums.size == 1:
        return {**_undetermined(diff, d.size), "n_clusters": 1}
    boot = _resampled_means(sums, sizes, n_resamples, seed)
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.count_nonzero(np.abs(boot - diff) >= abs(diff)))
    return {
        "diff": diff,
        "low": float(low),
        "high": float(high),
        "p_value": (extreme + 1) / (n_resamples + 1),
        "n": int(d.size),
        "n_clusters": int(sums.size),
    }
