"""The benchmark's scoring: Clarke zones, coverage, and linking a site's test windows to the simulator's truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tiny_sites import ingested_features

from federated.evaluation import (
    SiteTruth,
    clarke_shares,
    clarke_zones,
    horizon_index,
    interval_coverage,
    load_truth,
    rmse,
    truth_at_targets,
)
from flows.demo_sites.generate import SitePaths
from models.twin import HORIZON_STEPS, Windows, build_windows

# (reference, forecast) pairs in mg/dL that fall inside each zone of Clarke et al. (1987), away from its lines.
ZONE_POINTS = {
    "A": [(100, 100), (50, 65), (60, 40), (200, 230), (300, 250), (80, 95)],
    "B": [(100, 130), (300, 200), (150, 100), (200, 300), (250, 340), (100, 75)],
    "C": [(100, 250), (150, 25), (80, 200), (170, 50)],
    "D": [(300, 120), (50, 100), (65, 100), (250, 75), (30, 170)],
    "E": [(200, 50), (50, 250), (300, 20), (40, 300)],
}


@pytest.mark.parametrize("zone", sorted(ZONE_POINTS))
def test_clarke_zone_of_points_known_to_lie_in_it(zone: str) -> None:
    """Points well inside a zone of the 1987 grid are given that zone, one at a time and as arrays."""
    reference, forecast = np.array(ZONE_POINTS[zone], dtype=float).T
    assert clarke_zones(reference, forecast).tolist() == [zone] * len(reference)
    for x, y in ZONE_POINTS[zone]:
        assert str(clarke_zones(np.array(x), np.array(y))) == zone


def test_clarke_zone_a_is_twenty_percent_and_both_low() -> None:
    """Zone A is exactly within 20% of the reference, or both values below 70."""
    reference = np.array([100.0, 100.0, 100.0, 100.0, 60.0, 69.0])
    forecast = np.array([120.0, 120.1, 80.0, 79.9, 20.0, 5.0])
    assert clarke_zones(reference, forecast).tolist() == ["A", "B", "A", "B", "A", "A"]


def test_clarke_shares_skip_unknown_references() -> None:
    """Shares are over pairs with a known reference: A and A+B."""
    reference = np.array([100.0, 100.0, 300.0, np.nan])
    forecast = np.array([100.0, 130.0, 120.0, 500.0])
    assert clarke_shares(reference, forecast) == {"A": pytest.approx(1 / 3), "A+B": pytest.approx(2 / 3)}


def test_interval_coverage_counts_known_targets_inside_bounds() -> None:
    """Coverage is the share of known targets within [lower, upper], bounds included."""
    pred = np.array([[[90.0, 100.0, 110.0], [90.0, 100.0, 110.0]], [[0.0, 50.0, 100.0], [0.0, 50.0, 100.0]]])
    target = np.array([[90.0, 111.0], [np.nan, 100.0]])
    assert interval_coverage(pred, target) == pytest.approx(2 / 3)
    assert np.isnan(interval_coverage(pred, np.full((2, 2), np.nan)))
    assert rmse(np.array([1.0, 2.0, 9.0]), np.array([1.0, 4.0, np.nan])) == pytest.approx(np.sqrt(2.0))


def test_horizon_index_matches_target_bins() -> None:
    """The 30-minute target is bin 6 (index 5), the 120-minute one the last."""
    assert horizon_index(30) == 5 and horizon_index(60) == 11 and horizon_index(120) == HORIZON_STEPS - 1
    with pytest.raises(ValueError):
        horizon_index(32)


# --- truth linkage on a tiny generated site ----------------------------------------------------------------------

SITE = "aurelia"  # FHIR: the site pseudonymizes the server's Patient.id, not the MRN


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Windows]:
    """A 4-patient, 2-day Aurelia through ingestion and features, its secret where the site flow keeps it."""
    folder = tmp_path_factory.mktemp("truth")
    features = ingested_features(folder, SITE, patients=4, days=2)
    return folder, build_windows(features, stride=6)


def test_truth_is_the_bin_mean_of_the_right_patient(tiny_site: tuple[Path, Windows]) -> None:
    """Every window links to its MRN's true glucose; a target's truth is the mean of its bin's five minutes."""
    folder, windows = tiny_site
    truth = load_truth(folder, SITE)
    values = truth_at_targets(windows, truth)

    assert values.shape == (len(windows), HORIZON_STEPS) and not np.isnan(values).any()
    # The sensor reads interstitial glucose with noise: close to the truth, never equal to it.
    observed = ~np.isnan(windows.target)
    gap = np.abs(windows.target[observed] - values[observed])
    assert np.median(gap) < 15.0 and np.corrcoef(windows.target[observed], values[observed])[0, 1] > 0.9
    # By hand for one window: its person's row in the truth, the minutes of its 30-minute bin.
    row = len(windows) // 2
    person = int(np.searchsorted(truth.person_id, windows.person_id[row]))
    start = (windows.t0[row].astype("datetime64[ms]").astype(np.int64) - truth.start_ms[person]) // 60_000 + 30
    minutes = truth.bg[truth.offset[person] + start : truth.offset[person] + start + 5]
    assert values[row, horizon_index(30)] == pytest.approx(minutes.mean())
    glucose = pl.read_parquet(SitePaths.under(folder, SITE).truth / "glucose.parquet")
    assert glucose["mrn"].n_unique() == len(truth.person_id)


def test_truth_under_another_secret_is_refused(tiny_site: tuple[Path, Windows]) -> None:
    """Windows whose people are not in the truth (wrong key) raise instead of scoring against someone else."""
    folder, windows = tiny_site
    truth = load_truth(folder, SITE)
    shifted = SiteTruth(truth.person_id + 1, truth.start_ms, truth.offset, truth.length, truth.bg)
    with pytest.raises(ValueError, match="no true glucose"):
        truth_at_targets(windows, shifted)
