"""Twin surrogate: leak-free windows, non-crossing quantiles, beats persistence, calibrated intervals, sane what-ifs."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from data_contracts.schema import TABLES
from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.features import BIN_MS, GRID_SCHEMA, STATIC_SCHEMA, FeatureSet, build_features
from flows.ingest.mapping import mapping_for
from flows.ingest.records import ingest_records
from models.twin import (
    HISTORY_STEPS,
    HORIZON_STEPS,
    QUANTILES,
    STATIC_CHANNELS,
    Calibration,
    Normalizer,
    TwinSurrogate,
    Windows,
    apply,
    build_windows,
    calibrate,
    coverage,
    fit_local,
    load_state_arrays,
    pinball_loss,
    predict,
    state_arrays,
    window_moments,
)
from models.twin.windows import NORMALIZED

SITE = "lakeside"  # Dexcom every 3 minutes: one or two readings per 5-minute bin
T0 = datetime(2026, 1, 5, tzinfo=UTC)
AT_30, AT_60, AT_120 = 30 // 5 - 1, 60 // 5 - 1, 120 // 5 - 1  # target index of each horizon


# --- hand-built grids --------------------------------------------------------------------------------------------


def hand_grid(cgm: dict[int, list[float | None]], carbs: dict[int, dict[int, float]] | None = None) -> FeatureSet:
    """A FeatureSet with one person per `cgm` entry (their readings bin by bin) and constant basal."""
    rows = []
    for person_id, values in cgm.items():
        for step, value in enumerate(values):
            grams = (carbs or {}).get(person_id, {}).get(step, 0.0)
            rows.append((person_id, T0.timestamp() * 1000 + step * BIN_MS, value, int(value is not None), 0.1, grams))
    frame = pl.DataFrame(
        rows, schema=["person_id", "ms", "cgm_mg_dl", "cgm_count", "basal_u", "carbs_logged_g"], orient="row"
    )
    grid = frame.select(
        "person_id",
        bin_start=pl.from_epoch(pl.col("ms").cast(pl.Int64), time_unit="ms").dt.replace_time_zone("UTC"),
        cgm_mg_dl="cgm_mg_dl",
        cgm_count="cgm_count",
        basal_u="basal_u",
        bolus_u=pl.lit(0.0),
        carbs_logged_g="carbs_logged_g",
        carbs_bolus_g=pl.lit(0.0),
    ).cast(GRID_SCHEMA)
    static = pl.DataFrame({"person_id": list(cgm)}).with_columns(
        pl.lit(8532).alias("gender_concept_id"), pl.lit(1990).alias("year_of_birth"), pl.lit(36).alias("age_years")
    )
    static = static.with_columns(pl.lit(None).alias(c) for c in STATIC_SCHEMA if c not in static.columns)
    return FeatureSet(grid=grid, static=static.select(list(STATIC_SCHEMA)).cast(STATIC_SCHEMA))


def reference_origins(values: list[float | None], stride: int) -> list[int]:
    """The kept origins of one person, by the rule spelled out bin by bin."""
    kept = []
    for origin in range(HISTORY_STEPS - 1, len(values) - HORIZON_STEPS, stride):
        ahead = values[origin + 1 : origin + 1 + HORIZON_STEPS]
        if values[origin] is not None and 2 * sum(v is not None for v in ahead) >= HORIZON_STEPS:
            kept.append(origin)
    return kept


def readings(rng: np.random.Generator, bins: int, gap_share: float) -> list[float | None]:
    """A glucose walk with gaps."""
    walk = 140.0 + np.cumsum(rng.normal(0.0, 3.0, bins))
    return [None if rng.random() < gap_share else float(v) for v in walk]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    lengths=st.lists(st.integers(10, 90), min_size=1, max_size=3),
    gap_share=st.sampled_from([0.0, 0.2, 0.5, 0.8]),
    stride=st.integers(1, 4),
)
def test_kept_windows_follow_the_rule(seed: int, lengths: list[int], gap_share: float, stride: int) -> None:
    """Exactly the origins with a reading in t0's bin and at least half the target observed are kept, in order."""
    rng = np.random.default_rng(seed)
    cgm = {person_id: readings(rng, bins, gap_share) for person_id, bins in enumerate(lengths, start=1)}
    windows = build_windows(hand_grid(cgm), stride=stride)

    expected = [(p, o) for p, values in cgm.items() for o in reference_origins(values, stride)]
    got = [(int(p), int((t - np.datetime64(T0.replace(tzinfo=None), "ms")) // np.timedelta64(5, "m")))
           for p, t in zip(windows.person_id, windows.t0, strict=True)]  # fmt: skip
    assert got == expected
    assert windows.history.shape == (len(expected), HISTORY_STEPS, 5)
    assert windows.future_inputs.shape == (len(expected), HORIZON_STEPS, 3)
    assert windows.static.shape == (len(expected), len(STATIC_CHANNELS)) and not np.isnan(windows.static).any()
    for row, (person_id, origin) in enumerate(expected):
        ahead = [np.nan if v is None else v for v in cgm[person_id][origin + 1 : origin + 1 + HORIZON_STEPS]]
        np.testing.assert_allclose(windows.target[row], np.array(ahead, dtype=np.float32))
        assert windows.last_cgm[row] == np.float32(cgm[person_id][origin])


def test_gaps_are_filled_from_the_past_and_flagged() -> None:
    """A gap takes the latest earlier reading of the history (the first one at its start) and is marked unobserved."""
    values: list[float | None] = [float(100 + i) for i in range(HISTORY_STEPS + HORIZON_STEPS)]
    for gap in (0, 1, 5, 6, 7, 20):
        values[gap] = None
    windows = build_windows(hand_grid({1: values}), stride=100)

    assert len(windows) == 1
    cgm, observed = windows.history[0, :, 0], windows.history[0, :, 1]
    assert observed.tolist() == [0.0 if v is None else 1.0 for v in values[:HISTORY_STEPS]]
    assert cgm[:2].tolist() == [102.0, 102.0]  # leading gap: the history's first reading, not anything later
    assert cgm[5:8].tolist() == [104.0, 104.0, 104.0]
    assert cgm[20] == 119.0
    assert cgm[observed == 1].tolist() == [v for v in values[:HISTORY_STEPS] if v is not None]


def test_history_never_sees_after_t0() -> None:
    """Changing CGM after t0 leaves every history alone; changing a planned meal changes only that plan."""
    rng = np.random.default_rng(7)
    values = readings(rng, 120, 0.1)
    base = build_windows(hand_grid({1: values}), stride=1)
    cut = 70  # grid bin from which the future is rewritten
    later = [v if i < cut or v is None else v + 80.0 for i, v in enumerate(values)]
    rewritten = build_windows(hand_grid({1: later}), stride=1)
    meal = build_windows(hand_grid({1: values}, carbs={1: {cut: 60.0}}), stride=1)

    origin = (base.t0 - np.datetime64(T0.replace(tzinfo=None), "ms")) // np.timedelta64(5, "m")
    before = origin < cut
    assert before.any() and (~before).any()
    np.testing.assert_array_equal(rewritten.t0, base.t0)
    np.testing.assert_array_equal(rewritten.history[before], base.history[before])
    assert not np.array_equal(rewritten.target[before], base.target[before], equal_nan=True)

    np.testing.assert_array_equal(meal.history[before], base.history[before])
    np.testing.assert_array_equal(meal.target, base.target)
    planned = (origin < cut) & (origin + HORIZON_STEPS >= cut)
    changed = np.any(meal.future_inputs != base.future_inputs, axis=(1, 2))
    np.testing.assert_array_equal(changed, planned)
    assert (meal.future_inputs[planned, :, 2].sum(axis=1) - base.future_inputs[planned, :, 2].sum(axis=1) == 60).all()


def test_normalizer_from_summed_site_moments_equals_pooled_fit() -> None:
    """Summing two sites' moments gives the Normalizer of their pooled windows, and it survives to_dict."""
    rng = np.random.default_rng(3)
    site_a = build_windows(hand_grid({1: readings(rng, 90, 0.1)}), stride=1)
    site_b = build_windows(hand_grid({2: readings(rng, 70, 0.3)}), stride=2)
    pooled = Windows(**{f.name: np.concatenate([getattr(site_a, f.name), getattr(site_b, f.name)])
                        for f in dataclasses.fields(Windows)})  # fmt: skip

    federated = Normalizer.fit_from_moments(window_moments(site_a) + window_moments(site_b))
    central = Normalizer.fit(pooled)
    np.testing.assert_allclose(federated.mean, central.mean, rtol=1e-9)
    np.testing.assert_allclose(federated.std, central.std, rtol=1e-9)
    restored = Normalizer.from_dict(federated.to_dict())
    np.testing.assert_array_equal(restored.mean, federated.mean)
    np.testing.assert_array_equal(restored.std, federated.std)


# --- the network ---------------------------------------------------------------------------------------------------


def unit_normalizer() -> Normalizer:
    """Mean 0, std 1 for every quantity."""
    return Normalizer(mean=np.zeros(len(NORMALIZED)), std=np.ones(len(NORMALIZED)))


def random_inputs(n: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arbitrary history, plan and static tensors."""
    generator = torch.Generator().manual_seed(seed)
    history = torch.randn(n, HISTORY_STEPS, 5, generator=generator) * scale
    future = torch.randn(n, HORIZON_STEPS, 3, generator=generator).abs() * scale
    return history, future, torch.randn(n, len(STATIC_CHANNELS), generator=generator) * scale


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_quantiles_never_cross(scale: float) -> None:
    """For arbitrary inputs and weights the output is (n, 24, 3) with lower <= median <= upper everywhere."""
    torch.manual_seed(11)
    model = TwinSurrogate(unit_normalizer())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
        pred = model(*random_inputs(512, scale, seed=int(scale)))

    assert pred.shape == (512, HORIZON_STEPS, len(QUANTILES))
    assert torch.isfinite(pred).all()
    assert (pred[..., 0] <= pred[..., 1]).all() and (pred[..., 1] <= pred[..., 2]).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), channel=st.sampled_from([0, 1, 2]), step=st.integers(0, HORIZON_STEPS - 1))
def test_planned_insulin_never_raises_and_carbs_never_lower_the_median(seed: int, channel: int, step: int) -> None:
    """For any weights, more planned basal or bolus never raises the median; more carbohydrate never lowers it."""
    torch.manual_seed(seed)
    model = TwinSurrogate(unit_normalizer())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
        history, future, static = random_inputs(64, 1.0, seed=seed)
        more = future.clone()
        more[:, step, channel] += 2.0
        change = model(history, more, static)[..., 1] - model(history, future, static)[..., 1]

    assert torch.isfinite(change).all()
    if channel == 2:
        assert (change >= -1e-3).all() and (change[:, step:] > 0).any()
    else:
        assert (change <= 1e-3).all() and (change[:, step:] < 0).any()
    assert (change[:, :step].abs() <= 1e-3).all()  # a dose does nothing before it is taken


def test_pinball_loss_is_per_window_and_masks_nan() -> None:
    """Per-window losses; NaN or masked-out bins add nothing and pass no NaN into gradients."""
    pred = torch.tensor([[[90.0, 100.0, 110.0]] * HORIZON_STEPS] * 3, requires_grad=True)
    target = torch.full((3, HORIZON_STEPS), 100.0)
    target[0, 0] = 120.0  # 10 above the upper quantile
    target[1, :] = float("nan")
    target[2, 0] = float("nan")
    target[2, 1] = 120.0
    mask = torch.ones(3, HORIZON_STEPS, dtype=torch.bool)
    mask[2, 1] = False

    loss = pinball_loss(pred, target, mask)
    loss.sum().backward()

    # A target on the median costs 0.05 x 10 + 0 + 0.05 x 10 = 1; one at 120 costs 0.05 x 30 + 0.5 x 20 + 0.95 x 10.
    assert loss.shape == (3,)
    assert loss[0].item() == pytest.approx((21.0 + (HORIZON_STEPS - 1) * 1.0) / HORIZON_STEPS)
    assert loss[1].item() == 0.0
    assert loss[2].item() == pytest.approx(1.0)  # the mean over its 22 clean bins only
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert (pred.grad[1] == 0).all() and (pred.grad[2, :2] == 0).all() and (pred.grad[2, 2:] != 0).any()


# Opacus' hooks warn when no input requires a gradient; the parameters do, which is all that matters here.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_opacus_gives_each_window_its_own_gradient() -> None:
    """Opacus accepts the model, and its per-sample gradients equal each window's gradient computed alone."""
    torch.manual_seed(5)
    model = TwinSurrogate(unit_normalizer())
    alone = TwinSurrogate(unit_normalizer())
    alone.load_state_dict(model.state_dict())
    history, future, static = random_inputs(6, 1.0, seed=2)
    target, mask = torch.randn(6, HORIZON_STEPS) * 20, torch.ones(6, HORIZON_STEPS, dtype=torch.bool)

    assert ModuleValidator.validate(model, strict=False) == []
    private = GradSampleModule(model, loss_reduction="sum")
    pinball_loss(private(history, future, static), target, mask).sum().backward()
    pinball_loss(alone(history[2:3], future[2:3], static[2:3]), target[2:3], mask[2:3]).sum().backward()
    for (name, parameter), single in zip(model.named_parameters(), alone.parameters(), strict=True):
        per_sample = parameter.grad_sample  # type: ignore[attr-defined]  # set by Opacus
        torch.testing.assert_close(per_sample[2], single.grad, msg=name, atol=1e-5, rtol=1e-4)


def test_calibration_offset_is_the_finite_sample_quantile() -> None:
    """The offset is the ceil((1 - alpha)(n + 1))-th smallest score; too few scores give an infinite offset."""
    scores = np.arange(1.0, 10.0)  # 9 held-out targets above the upper bound by 1..9
    pred = np.zeros((9, 2, 3))
    target = np.stack([scores, scores], axis=1)
    target[0, 1] = np.nan  # horizon 2 has 8 scores: rank ceil(0.9 * 9) = 9 > 8

    calibration = calibrate(pred, target, alpha=0.1)
    assert calibration.offsets[0] == 9.0 and np.isinf(calibration.offsets[1])
    assert calibration.counts.tolist() == [9, 8]
    narrowed = apply(np.array([[[-10.0, 0.0, 10.0]] * 2]), Calibration(np.array([-4.0, -30.0]), 0.1, np.ones(2)))
    assert narrowed[0, 0].tolist() == [-6.0, 0.0, 6.0]
    assert narrowed[0, 1].tolist() == [0.0, 0.0, 0.0]  # narrowed past the median: stops at it
    assert Calibration.from_dict(calibration.to_dict()).offsets[1] == np.inf


# --- on a generated site -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site_windows(tmp_path_factory: pytest.TempPathFactory) -> Windows:
    """Windows of a small generated Lakeside (12 patients, 4 days), through ingestion and features."""
    folder = tmp_path_factory.mktemp("twin")
    profile = next(p for p in load_profiles() if p.site.id == SITE).with_overrides(patients=12, days=4)
    generate_sites([profile], folder, workers=1)
    batch = ingest_records(
        SitePaths.under(folder, SITE).drop, mapping_for(SITE), secret=bytes(range(32)), workdir=folder / "work",
        build_docs=False,
    )  # fmt: skip
    features = build_features(batch.tables | {"image_feature": TABLES["image_feature"].empty()})
    return build_windows(features)


@dataclasses.dataclass(frozen=True)
class Trained:
    """A model fitted on 8 patients and its forecasts for the 4 held out."""

    model: TwinSurrogate
    held_out: Windows
    pred: np.ndarray


@pytest.fixture(scope="module")
def trained(site_windows: Windows, one_thread: None) -> Trained:
    """Train on 8 of the 12 patients (split by person), forecast the other 4."""
    persons = np.unique(site_windows.person_id)
    np.random.default_rng(0).shuffle(persons)
    training = site_windows.select(np.isin(site_windows.person_id, persons[:8]))
    held_out = site_windows.select(~np.isin(site_windows.person_id, persons[:8]))
    torch.manual_seed(0)
    model = TwinSurrogate(Normalizer.fit(training))
    history = fit_local(model, training, epochs=8, lr=2e-3, batch_size=128, seed=0)
    assert history["epoch_loss"][-1] < history["epoch_loss"][0]
    return Trained(model=model, held_out=held_out, pred=predict(model, held_out))


def rmse(forecast: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error over observed targets."""
    return float(np.sqrt(np.nanmean((forecast - target) ** 2)))


def test_median_beats_persistence_on_held_out_patients(trained: Trained) -> None:
    """At 30 and 60 minutes the median forecast has lower RMSE than carrying the last CGM forward."""
    target, last = trained.held_out.target, trained.held_out.last_cgm
    for step, minutes in ((AT_30, 30), (AT_60, 60)):
        model, persistence = rmse(trained.pred[:, step, 1], target[:, step]), rmse(last, target[:, step])
        print(
            f"RMSE at {minutes} min: model {model:.1f}, persistence {persistence:.1f} mg/dL, {model / persistence:.2f}x"
        )
        assert model < persistence


def test_conformal_intervals_cover_ninety_percent(trained: Trained) -> None:
    """Calibrated on the other held-out patients, each held-out patient's 90% intervals cover 85-95% overall."""
    held_out, pred = trained.held_out, trained.pred
    inside, observed = 0.0, 0
    for person_id in np.unique(held_out.person_id):
        test = held_out.person_id == person_id
        calibrated = apply(pred[test], calibrate(pred[~test], held_out.target[~test], alpha=0.1))
        covered = coverage(calibrated, held_out.target[test])
        counts = (~np.isnan(held_out.target[test])).sum(axis=0)
        inside, observed = inside + float((covered * counts).sum()), observed + int(counts.sum())
    raw = float(np.nanmean(coverage(pred, held_out.target)))
    print(f"90% interval coverage: raw {raw:.3f}, conformalized {inside / observed:.3f}")
    assert 0.85 <= inside / observed <= 0.95


def test_what_if_bolus_lowers_and_carbs_raise_glucose(trained: Trained) -> None:
    """With 3 U more bolus planned now the 120-minute median is lower for most windows; with 60 g more carbs higher."""
    held_out, base = trained.held_out, trained.pred[:, AT_120, 1]
    outcome = {}
    for channel, amount in ((1, 3.0), (2, 60.0)):
        plan = held_out.future_inputs.copy()
        plan[:, 0, channel] += amount
        outcome[channel] = predict(trained.model, dataclasses.replace(held_out, future_inputs=plan))[:, AT_120, 1]
    bolus, meal = np.mean(outcome[1] - base), np.mean(outcome[2] - base)
    print(f"120-min what-if, mean change: +3 U bolus {bolus:+.1f} mg/dL, +60 g carbs {meal:+.1f} mg/dL")
    assert np.mean(outcome[1] < base) > 0.9
    assert np.mean(outcome[2] > base) > 0.9


def test_state_arrays_round_trip_and_training_is_seeded(site_windows: Windows, trained: Trained) -> None:
    """A model loaded from state_arrays predicts identically; the same seed trains to the same weights."""
    copy = TwinSurrogate(trained.model.normalizer())
    load_state_arrays(copy, state_arrays(trained.model))
    np.testing.assert_array_equal(predict(copy, trained.held_out), trained.pred)

    few = site_windows.select(np.arange(300))
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = TwinSurrogate(Normalizer.fit(few))
        fit_local(model, few, epochs=1, lr=1e-3, batch_size=64, seed=4)
        runs.append(state_arrays(model))
    for first, second in zip(*runs, strict=True):
        np.testing.assert_array_equal(first, second)
