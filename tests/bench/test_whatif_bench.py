"""The what-if benchmark asks the simulator the twin's question: same plan change, and its change metrics are right."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from models.glucose_metrics import expected_time_in_range
from models.twin import HISTORY_STEPS, HORIZON_STEPS, Normalizer, TwinSurrogate, Windows, predict
from models.twin.scenarios import BASAL, BOLUS, CARBS, CATALOGUE
from models.twin.windows import FUTURE_CHANNELS, HISTORY_CHANNELS, NORMALIZED, STATIC_CHANNELS
from models.uva_padova.engine import SimResult, simulate
from models.uva_padova.population import expand_population
from models.uva_padova.pump import get_pump
from models.uva_padova.scenario import MealPlan
from models.uva_padova.sensor import get_sensor
from models.uva_padova.therapy import BasalBolusTherapy
from models.uva_padova.whatif import Alteration, what_if


def load_bench() -> ModuleType:
    """bench/whatif.py as a module (bench/ is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "whatif.py"
    spec = importlib.util.spec_from_file_location("bench_whatif", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


whatif = load_bench()
PLAN_BINS = whatif.PLAN_BINS
ORIGIN_MIN = 240  # the replays start 4 h into the hand-made day


def windows_for(plan: np.ndarray) -> Windows:
    """Windows whose only meaningful part is the plan: its first 2 h as future_inputs."""
    n = plan.shape[0]
    return Windows(
        history=np.zeros((n, HISTORY_STEPS, len(HISTORY_CHANNELS)), np.float32),
        future_inputs=plan[:, :HORIZON_STEPS].astype(np.float32),
        static=np.zeros((n, len(STATIC_CHANNELS)), np.float32),
        target=np.zeros((n, HORIZON_STEPS), np.float32),
        last_cgm=np.full(n, 120.0, np.float32),
        person_id=np.arange(n, dtype=np.int64),
        t0=np.zeros(n, dtype="datetime64[ms]"),
    )


def test_every_catalogue_scenario_maps_to_its_alteration() -> None:
    """Each scenario of the twin's catalogue becomes the simulator alteration with the same factor or delay."""
    expected = {
        "skip_meal_bolus": Alteration("skip_bolus"),
        "bolus_plus_20": Alteration("scale_bolus", factor=1.2),
        "basal_minus_10": Alteration("scale_basal", factor=0.9),
        "larger_meal": Alteration("scale_meal_carbs", factor=1.5),
        "later_meal": Alteration("shift_meal", minutes=30),
    }
    assert {s.scenario_id: whatif.alteration_for(s) for s in CATALOGUE} == expected


@pytest.fixture(scope="module", params=["GuardianRT", "Dexcom"])
def hand_made(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Two patients, 9 h: a meal 20 (patient 0) or 40 min (patient 1) into the 4-h replay, bolused exactly."""
    params = expand_population(2, seed=7)
    sensor = get_sensor(request.param)
    minutes = 9 * 60
    plan = MealPlan.from_events(
        2, minutes, [(0, 60, 40.0), (0, ORIGIN_MIN + 20, 50.0), (1, ORIGIN_MIN + 40, 30.0), (1, ORIGIN_MIN + 200, 20.0)]
    )
    # No correction above any glucose, no hypo treatment: the plan is exactly what the bolus calculator gives.
    therapy = replace(BasalBolusTherapy.for_patients(params, treat_hypos=False), correction_above_mg_dl=1e6)
    seeds = np.array([11, 12])
    run = simulate(
        params,
        meals_g=plan.announced_g(),
        dosing=therapy.dosing_plan(plan, sensor.sample_time),
        sensor=sensor,
        sensor_seeds=seeds,
        pump=get_pump(),
        record_states=True,
    )
    return params, sensor, plan, therapy, seeds, run


def test_mapping_gives_the_twin_scenarios_plan_change(hand_made) -> None:  # type: ignore[no-untyped-def]
    """Binned like the features, the simulator's altered replay delivers and eats the twin's altered plan."""
    params, sensor, plan, therapy, seeds, run = hand_made
    st = sensor.sample_time
    window = plan.window(ORIGIN_MIN, PLAN_BINS * 5, sample_time=st)
    for scenario in CATALOGUE:
        alteration = whatif.alteration_for(scenario)
        replays = what_if(
            params,
            run,
            plan,
            therapy,
            sensor=sensor,
            sensor_seeds=seeds,
            patients=np.arange(2),
            from_step=ORIGIN_MIN // st,
            steps=PLAN_BINS * 5 // st,
            alteration=alteration,
            pump=get_pump(),
        )
        recorded = np.zeros((2, PLAN_BINS, len(FUTURE_CHANNELS)))
        recorded[..., [BASAL, BOLUS]] = whatif.delivered_bins(replays.factual, PLAN_BINS)
        recorded[..., CARBS] = whatif.meal_bins(window, PLAN_BINS)
        twin_plan, applies = whatif.scenario_plan(windows_for(recorded), recorded.astype(np.float32), scenario)
        assert applies.all()

        altered_meals, _ = alteration.apply(window, st)
        simulated = np.zeros_like(recorded)
        simulated[..., [BASAL, BOLUS]] = whatif.delivered_bins(replays.counterfactual, PLAN_BINS)
        simulated[..., CARBS] = whatif.meal_bins(altered_meals, PLAN_BINS)
        assert not np.allclose(simulated, recorded), scenario.scenario_id  # the scenario changes something
        # Boluses and basal up to the pump's rounding of the scaled dose (0.05 U bolus increments).
        np.testing.assert_allclose(
            twin_plan[..., BOLUS], simulated[..., BOLUS], atol=0.03, err_msg=scenario.scenario_id
        )
        np.testing.assert_allclose(
            twin_plan[..., BASAL], simulated[..., BASAL], atol=2e-3, err_msg=scenario.scenario_id
        )
        np.testing.assert_allclose(twin_plan[..., CARBS], simulated[..., CARBS], err_msg=scenario.scenario_id)


def test_meal_matching_excludes_what_the_twin_cannot_see() -> None:
    """A missed-bolus meal first, or a late meal bolus, is excluded by reason; an on-time bolused meal is compared."""
    plan = MealPlan.from_events(3, 600, [(0, 30, 20.0), (0, 60, 50.0), (1, 30, 40.0), (2, 10, 40.0)])
    plan = replace(plan, bolus_carbs_g=np.array([0.0, 50.0, 40.0, 40.0]), bolus_delay_min=np.array([0, 0, 45, 0]))
    origin = np.zeros(3, dtype=np.int64)
    meals = whatif.first_meals(plan, np.arange(3), origin, 5)
    assert meals["found"].all() and meals["logged"].tolist() == [False, True, True]
    assert meals["bin"].tolist() == [6, 6, 2] and meals["bolus_bin"].tolist() == [-1, 16, 3]
    recorded = np.zeros((3, PLAN_BINS, 3), np.float32)  # what the records hold: logged meals and given boluses
    recorded[0, 12, CARBS], recorded[0, 13, BOLUS] = 50.0, 5.0
    recorded[1, 6, CARBS], recorded[1, 16, BOLUS] = 40.0, 4.0
    recorded[2, 2, CARBS], recorded[2, 3, BOLUS] = 40.0, 4.0
    skip = next(s for s in CATALOGUE if s.scenario_id == "skip_meal_bolus")
    _, applies = whatif.scenario_plan(windows_for(recorded), recorded, skip)
    matched, reasons = whatif.match_scenario(skip, recorded, applies, meals)
    assert matched.tolist() == [False, False, True]
    assert reasons == {"first_meal_unlogged_missed_bolus": 1, "meal_bolus_late_over_15_min": 1}


def test_change_metrics_on_a_tiny_example() -> None:
    """Correlation, MAE, mean changes, their ratio and the slope are what the definitions give by hand."""
    simulated, twin = np.array([-10.0, -20.0, -30.0, -40.0]), np.array([-4.0, -9.0, -16.0, -19.0])
    got = whatif.change_metrics(simulated, twin)
    assert got["n"] == 4
    assert got["mae"] == pytest.approx((6 + 11 + 14 + 21) / 4)
    assert got["mean_simulator_change"] == pytest.approx(-25.0) and got["mean_twin_change"] == pytest.approx(-12.0)
    assert got["effect_size_ratio"] == pytest.approx(12.0 / 25.0)
    assert got["pearson_r"] == pytest.approx(np.corrcoef(simulated, twin)[0, 1], abs=1e-4)
    assert got["slope_twin_on_simulator"] == pytest.approx(np.polyfit(simulated, twin, 1)[0], abs=1e-4)
    assert whatif.change_metrics(simulated, np.zeros(4))["pearson_r"] is None  # a constant side has no correlation


def test_mean_glucose_and_time_in_range_of_bins() -> None:
    """Mean glucose is the bins' mean; time in range is the share of bins within 70-180 inclusive, in percent."""
    summary = whatif.trajectory_summary(np.array([[60.0, 70.0, 180.0, 250.0], [100.0, 100.0, 100.0, 100.0]]))
    np.testing.assert_allclose(summary["mean_glucose"], [140.0, 100.0])
    np.testing.assert_allclose(summary["tir"], [50.0, 100.0])


def untrained_twin() -> TwinSurrogate:
    """A small-weights TwinSurrogate: its dose responses are already positive, so their signs hold."""
    torch.manual_seed(0)
    return TwinSurrogate(Normalizer(mean=np.full(len(NORMALIZED), 1.0), std=np.full(len(NORMALIZED), 2.0)))


def test_rolled_forecast_continues_the_two_hour_forecast() -> None:
    """The 4-h twin answer is the 2-h forecast, then a forecast from its median with the plan's next 2 h.

    The rolled forecast's median is the second forecast's; its half-widths add the first forecast's at 2 h in
    quadrature (it starts from a median, not from an observed reading).
    """
    model = untrained_twin()
    rng = np.random.default_rng(3)
    plan = rng.uniform(0, 1, (4, PLAN_BINS, 3)).astype(np.float32)
    windows = replace(windows_for(plan), history=rng.uniform(80, 200, (4, HISTORY_STEPS, 5)).astype(np.float32))
    path = whatif.twin_trajectories(model, windows, plan, keep_schedule=False)
    assert path.shape == (4, PLAN_BINS, 3)
    first = predict(model, windows)
    np.testing.assert_allclose(path[:, :HORIZON_STEPS], first)
    median = first[..., 1]
    history = np.concatenate([median[..., None], np.ones((4, HORIZON_STEPS, 1)), plan[:, :HORIZON_STEPS]], axis=2)
    rolled = replace(windows, history=history.astype(np.float32), future_inputs=plan[:, HORIZON_STEPS:])
    second = predict(model, rolled)
    np.testing.assert_allclose(path[:, HORIZON_STEPS:, 1], second[..., 1], rtol=1e-6)
    for q, side in ((0, -1.0), (2, 1.0)):
        carried = np.abs(first[:, -1, q] - median[:, -1])[:, None]
        own = second[..., q] - second[..., 1]
        np.testing.assert_allclose(
            path[:, HORIZON_STEPS:, q], second[..., 1] + side * np.hypot(own, carried), rtol=1e-5
        )


def test_time_in_range_references_separate_the_level_from_the_effect() -> None:
    """The exact change on a level 30 mg/dL too high counts the wrong crossings; on the true level it is exact.

    `tir_with_exact_effect_on_twin_level` takes the simulator's change on the twin's level; here the twin's change
    is the simulator's, so it equals the twin's own count. `tir_expected` is the change in expected time in range.
    """
    bins = PLAN_BINS
    sim_before = np.tile(np.linspace(150.0, 210.0, bins), (3, 1))
    effect = np.array([-10.0, -20.0, -40.0])[:, None] * np.ones(bins)
    sim_after = sim_before + effect
    twin_level = sim_before + 30.0
    twin_before = np.repeat(twin_level[..., None], 3, axis=2) + np.array([-25.0, 0.0, 25.0])
    twin_after = twin_before + effect[..., None]
    got = whatif._horizon_metrics(sim_before, sim_after, twin_before, twin_after, bins * 5)
    sim_tir = whatif.trajectory_summary(sim_after)["tir"] - whatif.trajectory_summary(sim_before)["tir"]
    assert got["mean_glucose"]["mean_twin_change"] == pytest.approx(effect[:, 0].mean(), abs=1e-3)
    assert got["tir_on_simulator_baseline"]["mae"] == pytest.approx(0.0)  # the exact change on the exact level
    assert got["tir"]["mae"] > 5.0  # the same change on the wrong level counts other crossings
    assert got["tir_with_exact_effect_on_twin_level"]["mae"] == pytest.approx(got["tir"]["mae"])
    assert got["tir_expected"]["mean_simulator_change"] == pytest.approx(sim_tir.mean(), abs=1e-3)
    expected = [expected_time_in_range(q[..., 0], q[..., 1], q[..., 2]) for q in (twin_before, twin_after)]
    assert got["tir_expected"]["mean_twin_change"] == pytest.approx((expected[1] - expected[0]).mean(), abs=1e-3)
    assert got["tir_expected"]["mean_twin_change"] != pytest.approx(got["tir"]["mean_twin_change"], abs=0.5)
    # The twin's change is the simulator's here, so the exact effect on the twin's level is the twin's own answer.
    exact = got["tir_expected_with_exact_effect_on_twin_level"]
    assert exact["mean_twin_change"] == pytest.approx(got["tir_expected"]["mean_twin_change"], abs=1e-3)


def test_rolled_forecast_keeps_the_origins_basal_schedule() -> None:
    """Steady basal rolls the same either way; a 4-h temporary basal 10% lower keeps raising glucose after 2 h."""
    model = untrained_twin()
    history = np.zeros((3, HISTORY_STEPS, 5), np.float32)
    history[..., 0], history[..., 1], history[..., 2] = 150.0, 1.0, 0.1  # CGM, observed, basal 0.1 U per bin
    plan = np.zeros((3, PLAN_BINS, 3), np.float32)
    plan[..., BASAL] = 0.1
    windows = replace(windows_for(plan), history=history)
    steady = [whatif.twin_trajectories(model, windows, plan, keep_schedule=k)[..., 1] for k in (True, False)]
    np.testing.assert_allclose(steady[0], steady[1], rtol=1e-6)
    lower = plan.copy()
    lower[..., BASAL] = 0.09
    kept, reset = (whatif.twin_trajectories(model, windows, lower, keep_schedule=k)[..., 1] for k in (True, False))
    np.testing.assert_allclose(kept[:, :HORIZON_STEPS], reset[:, :HORIZON_STEPS])
    assert (kept[:, HORIZON_STEPS:] - reset[:, HORIZON_STEPS:] > 0).all()


def test_delivered_bins_spread_three_minute_steps_over_five_minute_bins() -> None:
    """A 3-minute step's basal is split by minutes between bins; a bolus lands in its step's bin; units are kept."""
    steps = 10  # 30 minutes of 3-minute steps: 6 bins
    basal = np.full((1, steps), 0.01)
    bolus = np.zeros((1, steps))
    bolus[0, 3] = 2.0  # step 3 starts at minute 9: bin 1
    fake = SimResult(
        sample_time=3,
        bg=np.zeros((1, 31)),
        cgm=np.zeros((1, 11)),
        cgm_obs=np.zeros((1, 11)),
        cho_eaten_g=np.zeros((1, 30)),
        basal_u_per_min=basal,
        bolus_u=bolus,
        hypo_treat_g=np.zeros((1, steps)),
        final_state=None,
    )  # type: ignore[arg-type]
    bins = whatif.delivered_bins(fake, 6)
    np.testing.assert_allclose(bins[0, :, 0], 0.05)  # 5 minutes of 0.01 U/min in every bin
    np.testing.assert_allclose(bins[0, :, 1], [0.0, 2.0, 0.0, 0.0, 0.0, 0.0])


def test_simulator_change_explained_by_nested_patient_terms() -> None:
    """A change that is each patient's sensitivity times the dose: a per-patient dose slope explains all of it.

    The patient constant alone explains only part; the patient's reaction and the glucose level add nothing then.
    """
    rng = np.random.default_rng(5)
    person = np.repeat(np.arange(6), 40)
    sensitivity = rng.uniform(-40.0, -10.0, 6)[person]
    dose = np.zeros((len(person), 3))
    dose[:, BOLUS] = rng.uniform(0.1, 2.0, len(person))
    change = sensitivity * dose[:, BOLUS]
    zeros = np.zeros(len(person))
    got = whatif._simulator_change_explained(change, person, rng.uniform(80, 250, len(person)), zeros, zeros, dose)
    assert 0.0 < got["patient"] < 0.9
    assert got["patient_and_dose"] == pytest.approx(1.0, abs=1e-4)
    assert got["patient_dose_reaction_and_glucose_level"] == pytest.approx(1.0, abs=1e-4)
