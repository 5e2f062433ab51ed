"""pass@k against values computed by hand and by brute force."""

import itertools
import math

import pytest

from persd_online.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (20, 0, 10, 0.0), (5, 5, 3, 1.0),
    (10, 2, 5, 1 - math.comb(8, 5) / math.comb(10, 5)),   # 7/9
    (200, 13, 100, 1 - math.comb(187, 100) / math.comb(200, 100)),
])
def test_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_matches_brute_force_over_subsets():
    samples = [True, False, False, True, False, False]
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(len(samples), sum(samples), k) == pytest.approx(brute)


def test_mean_and_errors():
    assert mean_pass_at_k([(2, 1), (2, 0), (2, 2)], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="no tasks"):
        mean_pass_at_k([], 1)
