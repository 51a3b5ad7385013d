"""Paired comparison of two methods on the same cases (mean difference, bootstrap interval, Wilcoxon)."""

import math

import numpy as np
import pytest

from CovidGANSegLib.comparison import compare_to_reference, describe, paired_difference


def test_a_constant_lead_has_a_zero_width_interval_and_wins_every_case():
    b = [0.1, 0.3, 0.5, 0.2, 0.4, 0.6]
    r = paired_difference([v + 0.1 for v in b], b)
    assert r["n"] == 6 and r["mean_difference"] == pytest.approx(0.1)
    assert r["ci_low"] == pytest.approx(0.1) and r["ci_high"] == pytest.approx(0.1)
    assert (r["wins"], r["ties"], r["losses"]) == (6, 0, 0)
    assert r["wilcoxon_p"] == pytest.approx(2 / 2 ** 6)  # exact two-sided p: all six signs positive


def test_wilcoxon_matches_the_exact_small_sample_value():
    # differences 1..5, all positive: exact two-sided p = 2 / 2^5
    r = paired_difference([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r["wilcoxon_p"] == pytest.approx(0.0625)


def test_bootstrap_interval_agrees_with_the_normal_interval_for_many_cases():
    rng = np.random.default_rng(1)
    d = rng.normal(0.05, 0.2, size=400)
    r = paired_difference(d, np.zeros_like(d))
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert r["ci_low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r["ci_high"] == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_a_noisy_lead_over_few_cases_is_not_a_finding():
    # mean lead +0.09 over ten cases with three losses: the interval must reach below 0
    b = [0.10, 0.20, 0.60, 0.70, 0.05, 0.30, 0.50, 0.65, 0.15, 0.40]
    a = [0.30, 0.45, 0.45, 0.55, 0.30, 0.40, 0.65, 0.50, 0.35, 0.60]
    r = paired_difference(a, b)
    assert r["mean_difference"] == pytest.approx(0.09, abs=1e-9)
    assert r["ci_low"] < 0.0 < r["mean_difference"] < r["ci_high"]
    assert r["wilcoxon_p"] > 0.05 and (r["wins"], r["losses"]) == (7, 3)
    assert paired_difference(a, b) == r  # seeded: the same scores give the same interval


def test_missing_values_are_left_out_pairwise_and_degenerate_cases_have_no_interval():
    r = paired_difference([0.5, float("nan"), 0.7, None], [0.4, 0.2, float("inf"), 0.1])
    assert r["n"] == 1 and r["mean_difference"] == pytest.approx(0.1)
    assert r["ci_low"] is None and r["wilcoxon_p"] is None
    same = paired_difference([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
    assert same["mean_difference"] == 0.0 and same["wilcoxon_p"] is None and same["ties"] == 3
    assert paired_difference([], [])["mean_difference"] is None
    with pytest.raises(ValueError, match="same cases"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.1, 0.2], [0.1, 0.2], confidence=1.0)


def test_compare_to_reference_pairs_cases_by_id():
    per_case = {
        "transunet": [{"id": "b", "dice": 0.5}, {"id": "a", "dice": 0.4}, {"id": "c", "dice": 0.9}],
        "hu_threshold": [{"id": "a", "dice": 0.2}, {"id": "c", "dice": 0.8}, {"id": "b", "dice": 0.6}],
    }
    out = compare_to_reference(per_case, "hu_threshold")
    assert out["reference"] == "hu_threshold" and set(out["methods"]) == {"transunet"}
    r = out["methods"]["transunet"]
    assert r["mean_difference"] == pytest.approx((0.2 + 0.1 - 0.1) / 3)
    assert (r["wins"], r["losses"]) == (2, 1)
    text = describe(r, "transunet", "hu_threshold")
    assert text.startswith("transunet - hu_threshold: Dice +0.067 (95 % CI") and "wins 2 of 3" in text
    with pytest.raises(ValueError, match="different cases"):
        compare_to_reference({**per_case, "unet": [{"id": "a", "dice": 0.1}]}, "hu_threshold")
    with pytest.raises(ValueError, match="reference"):
        compare_to_reference(per_case, "unet")
