"""The twin reproduces simglucose: same patients, scenario, controller, sensor noise and pump."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from models.uva_padova.params import load_base_patients
from models.uva_padova.pump import get_pump
from models.uva_padova.reference import run_simglucose, run_twin_like_simglucose
from models.uva_padova.sensor import get_sensor, sensor_names

# One patient of each cohort, on both sensors the brief names (3-min Dexcom, 5-min GuardianRT). Each case runs
# simglucose for a simulated day (~20 s): the default suite keeps one, the slow run checks all three.
CASES = [
    ("child#001", "Dexcom"),
    pytest.param("adolescent#003", "GuardianRT", marks=pytest.mark.slow),
    pytest.param("adult#001", "Dexcom", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "sensor"), CASES)
def test_one_day_blood_glucose_matches_simglucose_within_1_mg_dl(name: str, sensor: str) -> None:
    """Over one day with three meals, BG agrees with simglucose within 1 mg/dL at every step."""
    reference = run_simglucose(name, sensor=sensor, seed=11)
    twin = run_twin_like_simglucose(load_base_patients([name]), sensor=sensor, seeds=np.array([11]))
    steps = twin.bolus_u.shape[1]
    assert len(reference.bg_step_mean) >= steps
    diff = np.abs(reference.bg_step_mean[:steps] - twin.bg_step_mean()[0])
    assert diff.max() < 1.0, f"max |BG diff| {diff.max():.4f} mg/dL at step {diff.argmax()}"
    # The glucose moved: the day has meals and boluses, not a flat line that trivially agrees.
    assert np.ptp(reference.bg_step_mean) > 40.0
    # What the controller saw and what the pump delivered agree too.
    np.testing.assert_allclose(twin.cgm_obs[0, 1:], reference.cgm_seen[1 : steps + 1], atol=1.0)
    delivered = twin.insulin_u_per_min()[0].reshape(steps, -1).mean(axis=1)
    np.testing.assert_allclose(delivered, reference.insulin_u_per_min[:steps], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sensor", sensor_names())
def test_sensor_noise_equals_simglucose_noise(sensor: str) -> None:
    """For every sensor model, the vectorized noise equals simglucose's CGMNoise sample by sample."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pandas as pd
        from simglucose.sensor.cgm import SENSOR_PARA_FILE
        from simglucose.sensor.noise_gen import CGMNoise

    params = pd.read_csv(SENSOR_PARA_FILE)
    row = params.loc[params.Name == sensor].squeeze()
    seeds = np.array([0, 7, 12345])
    n = 400
    ours = get_sensor(sensor).noise(seeds, n)
    for i, seed in enumerate(seeds):
        generator = CGMNoise(row, seed=int(seed))
        theirs = np.array([next(generator) for _ in range(n)])
        np.testing.assert_allclose(ours[i], theirs, rtol=0, atol=1e-9)


def test_pump_rounding_equals_simglucose_pump() -> None:
    """Basal and bolus rates are rounded and capped as simglucose's Insulet pump does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from simglucose.actuator.pump import InsulinPump

    theirs = InsulinPump.withName("Insulet")
    ours = get_pump("Insulet")
    rates = np.concatenate([np.linspace(0, 0.05, 37), [0.0123456, 1.7, 29.99, 31.0, 80.0]])
    np.testing.assert_allclose(ours.deliver_basal(rates), [theirs.basal(r) for r in rates], rtol=0, atol=0)
    np.testing.assert_allclose(ours.deliver_bolus(rates), [theirs.bolus(r) for r in rates], rtol=0, atol=0)
