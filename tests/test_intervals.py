"""The demonstration's 95% intervals (Student t on paired differences) on known inputs."""

from __future__ import annotations

import math

import pytest

from petl_surgery.training.intervals import incomplete_beta, paired_interval, t_cdf, t_quantile


@pytest.mark.parametrize(
    "df, quantile",
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452), (100, 1.9840)],
)
def test_t_quantile_matches_the_tables(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=5e-5)


def test_t_distribution_is_symmetric_and_its_cdf_inverts_the_quantile():
    assert t_quantile(0.025, 5) == pytest.approx(-t_quantile(0.975, 5), abs=1e-12)
    assert t_cdf(0.0, 7) == pytest.approx(0.5, abs=1e-15)
    assert t_cdf(t_quantile(0.9, 6), 6) == pytest.approx(0.9, abs=1e-12)


def test_incomplete_beta_known_values():
    assert incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3, abs=1e-14)  # uniform
    assert incomplete_beta(2.0, 1.0, 0.5) == pytest.approx(0.25, abs=1e-14)  # x^2
    assert incomplete_beta(0.5, 0.5, 0.5) == pytest.approx(0.5, abs=1e-13)  # arcsine, symmetric


def test_paired_interval_of_known_differences():
    interval = paired_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * sd / sqrt(n)
    assert interval.mean == 2.5 and interval.n == 4
    assert interval.low == pytest.approx(2.5 - half, abs=1e-9)
    assert interval.high == pytest.approx(2.5 + half, abs=1e-9)
    assert interval.verdict == "higher"


def test_verdicts_follow_the_interval_and_need_three_pairs():
    assert paired_interval([1.0, 2.0, 3.0]).verdict == "inconclusive"  # [-0.48, 4.48] contains 0
    assert paired_interval([-5.0, -6.0, -7.0]).verdict == "lower"
    assert paired_interval([4.2, 4.2]).verdict == "inconclusive"  # a zero-width interval from 2 pairs
    single = paired_interval([3.0])
    assert single.mean == 3.0 and math.isnan(single.low) and single.verdict == "inconclusive"


def test_empty_differences_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        paired_interval([])
