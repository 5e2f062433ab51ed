"""Paired comparison statistics on constructed outcomes with known answers."""

import numpy as np
import pytest
from scipy.stats import binom

from persd_online.stats import paired_difference, pass1_interval, sign_test


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # 8 tasks improved, 1 worsened: p = 2 * P(X <= 1), X ~ Bin(9, 1/2) = 2 * 10/512
    assert sign_test(8, 1) == pytest.approx(2 * (1 + 9) / 512)
    assert sign_test(1, 8) == pytest.approx(sign_test(8, 1))
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert sign_test(20, 0) == pytest.approx(2 * binom.pmf(0, 20, 0.5))


def test_paired_difference_counts_discordant_tasks_only():
    a = [0, 0, 1, 1, 0, 1] * 10
    b = [1, 0, 1, 0, 0, 1] * 10  # 10 improved, 10 worsened: no difference
    result = paired_difference(a, b)
    assert (result.improved, result.worsened, result.n_tasks) == (10, 10, 60)
    assert result.difference.value == pytest.approx(0.0)
    assert result.p_value == 1.0
    assert result.verdict == "within noise"


def test_a_large_consistent_gain_is_detected():
    a = np.zeros(200)
    b = np.zeros(200)
    b[:40] = 1  # +0.20, never worse
    result = paired_difference(a, b)
    assert result.difference.value == pytest.approx(0.2)
    assert 0.14 < result.difference.low < 0.2 < result.difference.high < 0.26
    assert result.p_value < 1e-10
    assert result.verdict == "better"
    assert paired_difference(b, a).verdict == "worse"


def test_a_small_gain_on_few_tasks_is_within_noise():
    a = np.zeros(20)
    b = np.zeros(20)
    b[0] = 1  # one task out of 20: the 95% interval reaches zero
    result = paired_difference(a, b)
    assert result.difference.low == 0.0
    assert result.verdict == "within noise"
    assert result.p_value == 1.0


def test_paired_interval_is_narrower_than_the_unpaired_one():
    rng = np.random.default_rng(1)
    difficulty = rng.random(300)
    a = (difficulty < 0.3).astype(float)
    b = (difficulty < 0.36).astype(float)  # the same hard tasks fail for both
    paired = paired_difference(a, b).difference
    unpaired = (pass1_interval(b).high - pass1_interval(b).low) + (pass1_interval(a).high - pass1_interval(a).low)
    assert paired.high - paired.low < unpaired / 2
    assert paired.low > 0


def test_pass1_interval_covers_the_mean_and_is_seeded():
    rates = [1, 0, 0, 0] * 50
    interval = pass1_interval(rates)
    assert interval.value == pytest.approx(0.25)
    # binomial standard error sqrt(.25 * .75 / 200) = 0.031: a 95% interval about +-0.06
    assert interval.low == pytest.approx(0.25 - 0.06, abs=0.015)
    assert interval.high == pytest.approx(0.25 + 0.06, abs=0.015)
    assert pass1_interval(rates) == interval
    assert pass1_interval([0.0] * 10).text() == "0.000 [0.000, 0.000]"


def test_rates_from_several_samples_use_the_sign_test():
    a = [0.2, 0.4, 0.0, 1.0]
    b = [0.6, 0.4, 0.2, 0.8]
    result = paired_difference(a, b)
    assert (result.improved, result.worsened) == (2, 1)
    assert result.difference.value == pytest.approx(0.1)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pass1_interval([2.0])
    with pytest.raises(ValueError, match="non-empty"):
        pass1_interval([])
