"""Experiments (issue 6): candidate fixes for the twin's what-if fidelity, scored on bench/whatif.py's replays.

A prototype, not the product: nothing here is imported by the pipeline, and models/twin is left as it is. Each
variant is trained pooled and non-private on every site's train patients with the bench twin's TrainingBudget,
then scored by `whatif.score` on the same cached simulator replays (run bench/whatif.py first, same --cache-dir):

- `surrogate`: the current TwinSurrogate (what bench/whatif.py measures), for reference.
- `kernels`: `KernelTwin`. The response to a dose has a fixed physiological shape: the cumulative of a
  gamma(2) activity curve, t/T^2 exp(-t/T) (Hovorka's two-compartment absorption), for insulin action and for
  carbohydrate absorption, with one time constant each shared by all patients (learned, started at 75 and 45 min),
  and a size per patient: insulin and carbohydrate sensitivities (mg/dL per U, per g) from the static covariates
  only. The free part (CGM history and covariates, no plan) and the interval widths are the TwinSurrogate's.
  Fixed shapes break the degeneracy that confounding leaves: boluses follow carbohydrate by the patient's ratio,
  so free curves can only learn the net of the two, while a fast carbohydrate curve and a slow insulin curve give
  the net a shape from which both sizes can be read.
- `kernels_fixed`: KernelTwin with the time constants fixed at 75 and 45 min: the brief's "fixed kernels", and the
  form Opacus can train (a bare parameter on the top module has no per-sample gradient).
- `kernels_state`: KernelTwin whose sensitivities also see the last glucose (UVA/Padova's insulin-dependent
  glucose use grows with glucose, so the same dose lowers a high glucose more).
- `augmented`: TwinSurrogate trained with prior-consistent dose augmentation: half of the training windows get an
  extra planned bolus and an extra planned meal at random times, their targets moved by the effect the clinical
  rules of thumb give (1800 rule: ISF = 1800 / total daily insulin mg/dL per U; 500 rule: ICR = 500 / TDI g per U;
  so 3.6 mg/dL per g), through the same gamma(2) shapes with the literature time constants. Uses only what a site
  has (the mean daily insulin covariate), no ground truth.

Not tried, on purpose: pretraining on simulator replays of the demo patients. They are the very virtual patients
the benchmark replays, so it would leak the evaluator's ground truth into training; and pretraining on another
UVA/Padova population would make the benchmark compare the simulator with a copy of itself.

Writes bench/results/whatif_experiments.json: per variant the training, the forecast RMSE against the simulator
under the recorded plan, and per scenario and horizon n, correlation, MAE and effect-size ratio.

Usage: python bench/whatif_experiments.py [--data-dir data/bench-whatif] [--cache-dir DIR]
                                          [--variants kernels,kernels_fixed,kernels_state,augmented]
                                          [--epochs 8] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import whatif
from torch import nn
from torch.nn import functional as F

from models.twin import HISTORY_STEPS, HORIZON_STEPS, Normalizer, Windows, pinball_loss, window_tensors
from models.twin.windows import FUTURE_CHANNELS, HISTORY_CHANNELS, NORMALIZED, STATIC_CHANNELS, STATIC_REFERENCE

RESULTS = whatif.ROOT / "bench" / "results" / "whatif_experiments.json"
CGM, OBSERVED = HISTORY_CHANNELS.index("cgm_mg_dl"), HISTORY_CHANNELS.index("cgm_observed")
BASAL, BOLUS, CARBS = (FUTURE_CHANNELS.index(c) for c in ("basal_u", "bolus_u", "carbs_g"))
DOSES = HISTORY_STEPS + HORIZON_STEPS
INSULIN_PEAK_MIN, CARBS_PEAK_MIN = 75.0, 45.0  # gamma(2) activity peaks at T: rapid-acting analog; mixed meal
ISF_SCALE, CSF_SCALE = 40.0, 4.0  # softplus(0) x scale: a start of ~28 mg/dL per U and ~2.8 mg/dL per g
TDI = STATIC_CHANNELS.index("mean_daily_insulin_u")
PLAN_BLOCK = 4  # planned inputs summed over 20-minute blocks for the interval widths, as TwinSurrogate does


def absorbed(minutes: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Share of a dose's effect reached `minutes` after it: the gamma(2) cumulative 1 - (1 + t/T) exp(-t/T)."""
    t = minutes.clamp(min=0.0) / peak
    return 1.0 - (1.0 + t) * torch.exp(-t)


def dose_times() -> tuple[torch.Tensor, torch.Tensor]:
    """Minutes from each of the window's 48 doses to each target bin's middle, and to the last reading's middle.

    Dose d (history then plan) is in bin s = d - 23 from t0's bin, taken at the bin's start; target bin t (1..24)
    and t0's bin are averages over their 5 minutes, centred 2.5 min in.
    """
    step = torch.arange(DOSES, dtype=torch.float32) - (HISTORY_STEPS - 1)
    target = torch.arange(1, HORIZON_STEPS + 1, dtype=torch.float32)[:, None]
    return 5.0 * (target - step) + 2.5, (-5.0 * step + 2.5).expand(HORIZON_STEPS, -1)


class KernelTwin(nn.Module):
    """TwinSurrogate's forecaster (same free part) with fixed-shape dose responses sized by patient sensitivities.

    The free part mirrors models.twin.model.TwinSurrogate as of this experiment: a linear trend of the CGM history,
    an MLP (hidden 32) over that history, its mask, the level, the static covariates and four "on board" summaries
    of past doses, zero-initialised heads and interval widths from the context and the plan per 20 minutes. Only
    the dose effect differs: TwinSurrogate mixes learned curves with per-window weights from the MLP; here every
    dose acts through a fixed gamma(2) shape times a sensitivity of the patient (static covariates only).
    """

    mean: torch.Tensor
    std: torch.Tensor
    static_index: torch.Tensor
    on_board: torch.Tensor
    to_target: torch.Tensor
    to_now: torch.Tensor

    def __init__(
        self,
        normalizer: Normalizer,
        *,
        hidden: int = 32,
        depth: int = 2,
        state: bool = False,
        learn_peaks: bool = True,
    ) -> None:
        super().__init__()
        self.state = state  # sensitivities also depend on the last glucose (insulin acts more at high glucose)
        self.register_buffer("mean", torch.as_tensor(normalizer.mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(normalizer.std, dtype=torch.float32).clone())
        index = torch.tensor([NORMALIZED.index(n) for n in STATIC_CHANNELS])
        self.register_buffer("static_index", index, persistent=False)
        ago = torch.arange(HISTORY_STEPS - 1, -1, -1, dtype=torch.float32)
        weights = [(1 - ago / 48).clamp(min=0), (1 - ago / 36).clamp(min=0), (ago < 6).float(), (ago < 6).float()]
        self.register_buffer("on_board", torch.stack(weights), persistent=False)
        layers: list[nn.Module] = []
        for width_in in [HISTORY_STEPS * 2 + 1 + len(STATIC_CHANNELS) + len(weights)] + [hidden] * (depth - 1):
            layers += [nn.Linear(width_in, hidden), nn.LayerNorm(hidden), nn.GELU()]
        self.context = nn.Sequential(*layers)
        self.trend = nn.Linear(HISTORY_STEPS, HORIZON_STEPS, bias=False)
        self.change = nn.Linear(hidden, HORIZON_STEPS)
        self.width = nn.Linear(hidden, 2 * HORIZON_STEPS)
        self.width_plan = nn.Linear(HORIZON_STEPS // PLAN_BLOCK * len(FUTURE_CHANNELS), 2 * HORIZON_STEPS, bias=False)
        for head in (self.trend, self.change):
            nn.init.zeros_(head.weight)
        nn.init.zeros_(self.change.bias)
        # Patient-level: the static covariates only, so one patient has one insulin and one carbohydrate sensitivity.
        self.sensitivity = nn.Sequential(nn.Linear(len(STATIC_CHANNELS) + state, 32), nn.GELU(), nn.Linear(32, 2))
        log_peak = torch.log(torch.tensor([INSULIN_PEAK_MIN, CARBS_PEAK_MIN]))
        # A bare parameter on the top module has no per-sample gradient in Opacus: fixed peaks keep the model DP-ready.
        if learn_peaks:
            self.log_peak = nn.Parameter(log_peak)
        else:
            self.register_buffer("log_peak", log_peak)
        to_target, to_now = dose_times()
        self.register_buffer("to_target", to_target, persistent=False)
        self.register_buffer("to_now", to_now, persistent=False)

    def forward(self, history: torch.Tensor, future_inputs: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """Quantile forecasts in mg/dL for windows in raw units."""
        glucose_mean, glucose_std = self.mean[0], self.std[0]
        input_mean, input_std = self.mean[1:4], self.std[1:4]  # basal, bolus, carbs in NORMALIZED
        last = history[:, -1, CGM]
        trend = (history[..., CGM] - last[:, None]) / glucose_std
        static_z = ((static - self.mean[self.static_index]) / self.std[self.static_index]).clamp(-10.0, 10.0)
        doses = torch.cat([history[..., 2:], future_inputs], dim=1)
        scheduled = history[..., 2].mean(dim=1, keepdim=True)
        insulin = doses[..., BOLUS] + doses[..., BASAL] - scheduled  # units
        carbs = doses[..., CARBS]  # grams
        past_insulin, past_carbs = insulin[:, :HISTORY_STEPS] / input_std[1], carbs[:, :HISTORY_STEPS] / input_std[2]
        on_board = torch.stack([past_insulin @ self.on_board[0], past_carbs @ self.on_board[1],
                                past_insulin @ self.on_board[2], past_carbs @ self.on_board[3]], dim=1)  # fmt: skip
        level = ((last[:, None] - glucose_mean) / glucose_std).clamp(-5.0, 10.0)
        features = torch.cat([trend, level, history[..., OBSERVED], static_z, on_board.clamp(-20.0, 20.0)], dim=1)
        context = self.context(features)
        peaks = torch.exp(self.log_peak)
        effects = []
        for k, dose in ((0, insulin), (1, carbs)):
            response = absorbed(self.to_target, peaks[k]) - absorbed(self.to_now, peaks[k])  # (24, 48)
            effects.append(dose @ response.T)  # (n, 24): the doses' effect from now to each target, per unit
        sensitivity = self._sensitivity(static_z, level)
        effect = sensitivity[:, 1:2] * effects[1] - sensitivity[:, 0:1] * effects[0]
        median = last[:, None] + (self.trend(trend) + self.change(context)) * glucose_std + effect
        plan = ((future_inputs - input_mean) / input_std).view(-1, HORIZON_STEPS // PLAN_BLOCK, PLAN_BLOCK, 3)
        widths = F.softplus(self.width(context) + self.width_plan(plan.mean(dim=2).flatten(1))) * glucose_std
        return torch.stack([median - widths[:, :HORIZON_STEPS], median, median + widths[:, HORIZON_STEPS:]], dim=2)

    def _sensitivity(self, static_z: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """(n, 2) insulin (mg/dL per U) and carbohydrate (mg/dL per g) sensitivity; `level` is the scaled last CGM."""
        inputs = torch.cat([static_z, level], dim=1) if self.state else static_z
        return F.softplus(self.sensitivity(inputs)) * torch.tensor([ISF_SCALE, CSF_SCALE])

    def sensitivities(self, history: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """The sensitivities the model uses for these windows, (n, 2)."""
        static_z = ((static - self.mean[self.static_index]) / self.std[self.static_index]).clamp(-10.0, 10.0)
        level = ((history[:, -1:, CGM] - self.mean[0]) / self.std[0]).clamp(-5.0, 10.0)
        return self._sensitivity(static_z, level)


def prior_effect(
    static: torch.Tensor, bolus_step: torch.Tensor, bolus: torch.Tensor, carbs_step: torch.Tensor, carbs: torch.Tensor
) -> torch.Tensor:
    """Rules-of-thumb glucose change (n, 24) from an extra bolus and meal planned at the given steps (1..24)."""
    tdi = static[:, TDI].clamp(min=5.0)
    isf, csf = 1800.0 / tdi, torch.full_like(tdi, 1800.0 / 500.0)
    target = torch.arange(1, HORIZON_STEPS + 1, dtype=torch.float32)[None, :]
    insulin = absorbed(5.0 * (target - bolus_step[:, None]) + 2.5, torch.tensor(INSULIN_PEAK_MIN))
    meal = absorbed(5.0 * (target - carbs_step[:, None]) + 2.5, torch.tensor(CARBS_PEAK_MIN))
    return (csf * carbs)[:, None] * meal - (isf * bolus)[:, None] * insulin


def fit(model: nn.Module, windows: Windows, *, budget: Any, augment: bool) -> dict[str, Any]:
    """fit_local's loop (Adam, mean pinball loss, seeded shuffles), optionally with prior-consistent augmentation."""
    history, future_inputs, static, target = window_tensors(windows)
    generator = torch.Generator().manual_seed(budget.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    model.train()
    losses = []
    for _ in range(budget.epochs):
        total = 0.0
        for batch in _batches(len(windows), budget.batch_size, generator):
            plan, goal = future_inputs[batch], target[batch]
            if augment:
                plan, goal = _augmented(plan, goal, static[batch], generator)
            optimizer.zero_grad()
            loss = pinball_loss(model(history[batch], plan, static[batch]), goal, ~torch.isnan(goal)).mean()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        losses.append(round(total / len(windows), 4))
    model.eval()
    return {"epoch_loss": losses, "windows": len(windows)}


def _augmented(
    plan: torch.Tensor, target: torch.Tensor, static: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the windows get an extra bolus (0-3 U) and meal (0-40 g) at random plan steps; targets move by the prior."""
    n = len(plan)
    chosen = torch.rand(n, generator=generator) < 0.5
    bolus = torch.rand(n, generator=generator) * 3.0 * chosen
    carbs = torch.rand(n, generator=generator) * 40.0 * chosen
    bolus_step = torch.randint(1, HORIZON_STEPS + 1, (n,), generator=generator)
    carbs_step = torch.randint(1, HORIZON_STEPS + 1, (n,), generator=generator)
    plan = plan.clone()
    rows = torch.arange(n)
    plan[rows, bolus_step - 1, BOLUS] += bolus
    plan[rows, carbs_step - 1, CARBS] += carbs
    return plan, target + prior_effect(static, bolus_step.float(), bolus, carbs_step.float(), carbs)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    yield from torch.randperm(n, generator=generator).split(batch_size)


def train_variant(name: str, splits: dict[str, Any], budget: Any) -> tuple[nn.Module, dict[str, Any]]:
    """One pooled variant on every site's train patients, normalized by the summed moments (as the bench's twin)."""
    from federated.baselines import concat_windows
    from models.twin import TwinSurrogate, window_moments

    trains = [split.train for split in splits.values()]
    moments = window_moments(trains[0])
    for train in trains[1:]:
        moments = moments + window_moments(train)
    normalizer = Normalizer.fit_from_moments(moments)
    torch.manual_seed(budget.seed)
    model: nn.Module
    if name.startswith("kernels"):
        model = KernelTwin(normalizer, state=name == "kernels_state", learn_peaks=name != "kernels_fixed")
    else:
        model = TwinSurrogate(normalizer)
    started = time.perf_counter()
    history = fit(model, concat_windows(trains), budget=budget, augment=name == "augmented")
    return model, {**history, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    """Train each variant, score it on the cached replays, write bench/results/whatif_experiments.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=whatif.DEFAULT_DATA_DIR)
    parser.add_argument("--cache-dir", type=Path, help="where bench/whatif.py cached its replays (--data-dir)")
    parser.add_argument("--variants", default="kernels,kernels_fixed,kernels_state,augmented")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="score variants already trained and saved in --cache-dir")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dataclasses import replace

    from federated.baselines import TrainingBudget
    from flows.features import read_features
    from models.twin import build_windows, split_patients

    data_dir = args.data_dir.resolve()
    cache_dir = (args.cache_dir or data_dir).resolve()
    loaded = [whatif.SiteCases.load(cache_dir / f"whatif-cases-{site}.npz") for site in whatif.SITES]
    cases = [c for c in loaded if c is not None]
    if len(cases) != len(loaded):
        raise SystemExit(f"{cache_dir}: no current replays; run bench/whatif.py with the same --cache-dir first")
    splits = {
        s: split_patients(build_windows(read_features(data_dir / "sites" / s / "features"))) for s in whatif.SITES
    }
    budget = replace(TrainingBudget(), epochs=args.epochs)
    digest = whatif.twin_source_digest()  # a saved variant is reused only with the same models/twin code
    out: dict[str, Any] = {}
    if args.out.exists():  # keep variants measured earlier on the same twin code
        earlier = json.loads(args.out.read_text())
        out = earlier.get("variants", {}) if earlier.get("twin_source_sha256") == digest else {}
    for name in args.variants.split(","):
        saved = cache_dir / f"whatif-variant-{name}-{budget.epochs}ep-{digest}.pt"
        if args.reuse and saved.exists():
            model, training = torch.load(saved, weights_only=False)
        else:
            model, training = train_variant(name, splits, budget)
            torch.save((model, training), saved)
        with torch.no_grad():
            scenarios = whatif.score(cases, model)
            accuracy = whatif.baseline_accuracy(cases, model)
        entry: dict[str, Any] = {
            "training": training,
            "forecast_rmse_vs_simulator_mg_dl": accuracy,
            "scenarios": {
                sid: {"horizons_min": s["horizons_min"], "effect_by_minute": s["effect_by_minute"], "met": s["met"]}
                for sid, s in scenarios.items()
            },
            "met_target": all(all(s["met"].values()) for s in scenarios.values()),
        }
        if isinstance(model, KernelTwin):
            entry["learned"] = _kernel_summary(model, cases)
        out[name] = entry
        print(
            name,
            json.dumps(
                {
                    sid: {
                        m: {q: (v[q].get("pearson_r"), v[q].get("effect_size_ratio")) for q in whatif.QUANTITIES}
                        for m, v in s["horizons_min"].items()
                    }
                    for sid, s in scenarios.items()
                }
            ),
            flush=True,
        )
        result = {
            "budget": budget.__dict__,
            "twin_source_sha256": digest,
            "variants": out,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def _kernel_summary(model: KernelTwin, cases: list[Any]) -> dict[str, Any]:
    """The learned time constants and the spread of the patient-level sensitivities over the test patients."""
    static = torch.from_numpy(np.concatenate([c.windows.static for c in cases]))
    history = torch.from_numpy(np.concatenate([c.windows.history for c in cases]))
    sensitivity = model.sensitivities(history, static).detach().numpy()
    peaks = torch.exp(model.log_peak).detach().numpy()
    reference = {"tdi_reference_u": STATIC_REFERENCE["mean_daily_insulin_u"]}
    return {
        "insulin_peak_min": round(float(peaks[0]), 1),
        "carbs_peak_min": round(float(peaks[1]), 1),
        "insulin_sensitivity_mg_dl_per_u_p10_50_90": np.percentile(sensitivity[:, 0], [10, 50, 90]).round(1).tolist(),
        "carbs_sensitivity_mg_dl_per_g_p10_50_90": np.percentile(sensitivity[:, 1], [10, 50, 90]).round(2).tolist(),
        **reference,
    }


if __name__ == "__main__":
    main()
