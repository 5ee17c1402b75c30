"""Expected time in range from forecast quantiles: the certain case, the two-piece normal, and a sampled check."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from models.glucose_metrics import consensus_metrics, expected_time_in_range, probability_in_range


def test_zero_width_intervals_count_the_median_bins_in_range() -> None:
    median = np.array([[54.0, 69.9, 70.0, 120.0, 180.0, 180.1, 300.0, 100.0]])
    expected = expected_time_in_range(median, median, median)
    counted = consensus_metrics(median, axis=1)["tir_70_180_percent"]
    np.testing.assert_allclose(expected, counted)
    assert expected[0] == pytest.approx(100.0 * 4 / 8)  # 70, 120, 180 and 100: the bounds are in range


def test_probability_follows_each_half_of_the_interval() -> None:
    # Median on the upper bound: half the mass lies above 180, and the lower half-width does not matter there.
    on_bound = probability_in_range(np.array([150.0]), np.array([180.0]), np.array([260.0]))
    assert on_bound[0] == pytest.approx(0.5 - ndtr((70.0 - 180.0) / (30.0 / 1.6448536)), abs=1e-6)
    # A skewed interval: the chance of lying below 70 is read from the lower half only.
    below = 1.0 - probability_in_range(np.array([40.0]), np.array([90.0]), np.array([400.0]), high=1e9)
    assert below[0] == pytest.approx(ndtr((70.0 - 90.0) / (50.0 / 1.6448536)), abs=1e-6)


def test_expected_time_in_range_matches_sampling_the_two_piece_normal() -> None:
    rng = np.random.default_rng(7)
    median = rng.uniform(40.0, 260.0, size=(50, 24))
    lower = median - rng.uniform(0.0, 60.0, size=median.shape)
    upper = median + rng.uniform(0.0, 90.0, size=median.shape)
    draws = 4000
    z = rng.standard_normal((draws, *median.shape))
    spread = np.where(z < 0, median - lower, upper - median) / 1.6448536
    glucose = median + spread * z  # the two-piece normal: each half keeps its own scale
    sampled = 100.0 * ((glucose >= 70.0) & (glucose <= 180.0)).mean(axis=(0, 2))
    np.testing.assert_allclose(expected_time_in_range(lower, median, upper), sampled, atol=1.0)


def test_a_zero_width_half_puts_its_half_of_the_mass_on_the_median() -> None:
    """On a bound, a zero-width half counts in or out whole: half of the mass is exactly at the median."""
    lower = np.array([50.0, 70.0, 150.0, 180.0])
    median = np.array([70.0, 70.0, 180.0, 180.0])
    upper = np.array([70.0, 90.0, 180.0, 200.0])
    inside = probability_in_range(lower, median, upper)
    # (50, 70, 70): the lower half lies below 70, the upper half's mass sits on 70 (in range).
    # (70, 70, 90): the lower half's mass sits on 70 (in), the upper half spreads above it, nearly all under 180.
    np.testing.assert_allclose(inside, [0.5, 1.0 - ndtr(-110.0 / (20.0 / 1.6448536)), 1.0, 0.5], atol=1e-9)


def test_a_missing_quantile_gives_no_probability() -> None:
    inside = probability_in_range(np.array([np.nan, 90.0]), np.array([100.0, 100.0]), np.array([120.0, 120.0]))
    assert np.isnan(inside[0]) and not np.isnan(inside[1])


def test_quantiles_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="out of order"):
        expected_time_in_range(np.array([[130.0]]), np.array([[120.0]]), np.array([[140.0]]))
