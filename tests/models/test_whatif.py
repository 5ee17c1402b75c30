"""What-if replays: the factual replay is the recorded run; each alteration moves glucose the right way."""

from __future__ import annotations

import numpy as np
import pytest

from models.uva_padova.cohort import simulate_cohort
from models.uva_padova.whatif import Alteration, what_if


@pytest.fixture(scope="module")
def recorded():  # type: ignore[no-untyped-def]
    """A day of 20 patients without human error, every step's state recorded."""
    return simulate_cohort(20, 1, seed=31, sensor="GuardianRT", human_error=False, record_states=True)


def replay(recorded, alteration: Alteration, from_hour: int = 11):  # type: ignore[no-untyped-def]
    st = recorded.sensor.sample_time
    return what_if(
        recorded.params, recorded.result, recorded.plan, recorded.therapy,
        sensor=recorded.sensor, sensor_seeds=recorded.sensor_seeds, patients=np.arange(20),
        from_step=from_hour * 60 // st, steps=6 * 60 // st, alteration=alteration,
    )  # fmt: skip


def test_factual_replay_reproduces_the_recorded_run(recorded) -> None:  # type: ignore[no-untyped-def]
    """Replaying the original plan from a saved state gives the recorded glucose exactly."""
    run = replay(recorded, Alteration("scale_bolus", factor=1.0))
    assert np.array_equal(run.factual.bg, recorded.result.bg[:, 11 * 60 : 17 * 60 + 1])
    assert np.array_equal(run.factual.bg, run.counterfactual.bg)


@pytest.mark.parametrize(
    ("alteration", "direction"),
    [
        (Alteration("skip_bolus"), +1),
        (Alteration("scale_bolus", factor=1.2), -1),
        (Alteration("scale_basal", factor=0.9), +1),
        (Alteration("scale_meal", factor=1.5), +1),
        (Alteration("scale_meal_carbs", factor=1.5), +1),
    ],
)
def test_alteration_moves_mean_glucose_the_right_way(recorded, alteration: Alteration, direction: int) -> None:  # type: ignore[no-untyped-def]
    """Skipping a bolus, less basal or a bigger meal (bolused or not) raise mean glucose; a bigger bolus lowers it."""
    run = replay(recorded, alteration)
    change = run.counterfactual.bg.mean(axis=1) - run.factual.bg.mean(axis=1)
    # Patients with a meal in the window respond; the sign holds for the cohort mean and most patients.
    assert direction * change.mean() > 1.0
    assert (direction * change > 0).mean() >= 0.8
    assert np.array_equal(run.counterfactual.bg[:, 0], run.factual.bg[:, 0])


def test_later_meal_moves_the_glucose_peak_later(recorded) -> None:  # type: ignore[no-untyped-def]
    """Shifting the next meal (and its bolus) by 90 minutes moves the post-meal peak later."""
    run = replay(recorded, Alteration("shift_meal", minutes=90), from_hour=10)
    later = run.counterfactual.bg.argmax(axis=1) - run.factual.bg.argmax(axis=1)
    assert np.median(later) >= 45
