"""The twin surrogate: a small, Opacus-trainable network forecasting glucose quantiles 2 h ahead from a window.

Design, and why:

- The forecast is the last CGM plus a predicted change, so the network learns dynamics, not glucose levels.
- The change has three parts. A linear trend of the CGM history (relative to the last reading). A free part from
  a small MLP over that history, its observed mask, the glucose level, the static covariates and four
  "on board" summaries of the doses before t0 (insulin and carbohydrate, linearly decaying over 4 h and 3 h,
  and over the last 30 minutes). And the effect of every insulin and carbohydrate dose in the window, the two
  hours before t0 as well as the two planned after it, through response curves: a few curves per input shared
  by every window (positive increments, so non-decreasing with time since the dose), mixed per window with
  non-negative weights the MLP sets. Insulin only pushes glucose down, carbohydrate only up, and neither wears
  off within the window's 4 h. Past doses act through the same curves as planned ones (the part of their effect
  still to come), and basal counts as its deviation from the history's mean rate, so a steady basal schedule is
  neutral and a temporary one acts. The plan never enters the MLP, so it moves the median only through the curves.
- So a what-if answer always has the physiological sign. Its size is learned, and from observational data it is
  confounded: boluses follow carbohydrate (by the patient's ratio) and high glucose (corrections), so a site's
  records cannot fully separate their effects; the learned sizes are smaller than the true ones.
- Quantiles are the median minus and plus softplus widths, so they never cross. Widths may depend on the plan
  too (carbohydrate and insulin planned per 20 minutes: a large meal ahead widens the interval).
- Small on purpose (hidden width 32: ~8k parameters): patient-level DP noise is added to every parameter, and with
  tens of patients per hospital the noise a model can bear grows with its size. Shared curves, not per-window
  ones, also make it ~4x faster than a per-window curve (no (n, 24, 48) response tensor per window).
- Only Linear, LayerNorm, GELU and the curves module carry or touch parameters, and nothing mixes samples, so
  Opacus (its functorch path for the curves) and torch.func.vmap can compute per-sample gradients.
- The output heads of the free change start at zero: an untrained model forecasts the last reading plus the
  initial curves' effect of the doses, not noise.
- The Normalizer lives in buffers, so the model takes and returns raw units (mg/dL, U, g). `state_arrays` holds
  only trainable parameters: that is what federated averaging and DP noise should touch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.twin.windows import (
    FUTURE_CHANNELS,
    HISTORY_CHANNELS,
    HISTORY_STEPS,
    HORIZON_STEPS,
    NORMALIZED,
    QUANTILES,
    STATIC_CHANNELS,
    Normalizer,
    Windows,
)

CGM, OBSERVED = HISTORY_CHANNELS.index("cgm_mg_dl"), HISTORY_CHANNELS.index("cgm_observed")
BASAL, BOLUS, CARBS = (HISTORY_CHANNELS.index(c) for c in ("basal_u", "bolus_u", "carbs_g"))
INPUTS = HISTORY_CHANNELS[2:]  # basal_u, bolus_u, carbs_g
if INPUTS != FUTURE_CHANNELS:
    raise ImportError(f"history inputs {INPUTS} and planned inputs {FUTURE_CHANNELS} must be in the same order")
MEDIAN = QUANTILES.index(0.5)
RESPONSE_STEPS = HISTORY_STEPS + HORIZON_STEPS  # doses from the whole window: 2 h before t0 and 2 h planned
# Initial response curves: gamma(2)-shaped increments rising fastest this many 5-minute steps after the dose, each
# reaching CURVE_TOTAL glucose standard deviations per normalized dose over the 4 h. A meal and its bolus then first
# move the forecast by tens of mg/dL over 2 h, a sane start from which training reshapes and scales the curves.
CURVE_PEAKS = (6.0, 12.0, 20.0, 32.0)
CURVE_TOTAL = 0.2
# The curves' parameters are stored divided by CURVE_RATE and multiplied back in forward. Their raw gradients are
# ~20x smaller than the output heads', so plain and DP-SGD (which, unlike Adam, do not rescale per parameter) would
# barely reshape them; at rate 8 they move ~64x faster (measured: federated SGD without noise, 200 steps, RMSE30
# 18.4 -> 17.9 mg/dL on the demo sites).
CURVE_RATE = 8.0
# Doses before t0 still "on board": weight 1 - (steps before t0) / action time, insulin 4 h, carbohydrate 3 h.
INSULIN_ACTION_STEPS, CARB_ACTION_STEPS, RECENT_STEPS = 48, 36, 6
PLAN_BLOCK = 4  # planned inputs are summed over 20-minute blocks for the interval widths
ON_BOARD = 4


class ResponseCurves(nn.Module):
    """Shared non-decreasing response curves of glucose to a dose, and the effect of a window's doses on each.

    It holds no buffers (Opacus computes per-sample gradients of a custom layer only if it has none).
    """

    def __init__(self, *, kinds: int, curves: int) -> None:
        super().__init__()
        lag = torch.arange(RESPONSE_STEPS, dtype=torch.float64) + 0.5
        peaks = CURVE_PEAKS if curves == len(CURVE_PEAKS) else np.linspace(CURVE_PEAKS[0], CURVE_PEAKS[-1], curves)
        shapes = torch.stack([lag * torch.exp(-lag / float(peak)) for peak in peaks])
        increments = CURVE_TOTAL * shapes / shapes.sum(dim=1, keepdim=True)
        raw = torch.log(torch.expm1(increments)) / CURVE_RATE
        self.increments = nn.Parameter(raw.float().expand(kinds, -1, -1).clone())

    def forward(self, doses: torch.Tensor) -> torch.Tensor:
        """(n, kinds, RESPONSE_STEPS) normalized doses -> (n, kinds, curves, HORIZON_STEPS) change since t0."""
        # Dose d of the 48 (history then plan) sits at step s = d - 23 from t0's bin; target t (1..24) gains
        # curve(t - s) - curve(-s) from it: what the dose does between t0 and t. Column 0 of the padded curve is 0.
        dose_step = torch.arange(RESPONSE_STEPS, device=doses.device) - (HISTORY_STEPS - 1)
        target_step = torch.arange(1, HORIZON_STEPS + 1, device=doses.device)[:, None]
        until_target = (target_step - dose_step + 1).clamp(min=0)
        until_t0 = (1 - dose_step).clamp(min=0).expand(HORIZON_STEPS, -1)
        # (kinds, curves, steps + 1)
        curve = F.pad(torch.cumsum(F.softplus(CURVE_RATE * self.increments), dim=-1), (1, 0))
        response = curve[..., until_target] - curve[..., until_t0]  # (kinds, curves, targets, doses)
        return torch.einsum("nkd,kctd->nkct", doses, response)


class TwinSurrogate(nn.Module):
    """Forecast CGM quantiles (n, HORIZON_STEPS, len(QUANTILES)) in mg/dL from raw history, plan and covariates."""

    mean: torch.Tensor  # Normalizer buffers, (len(NORMALIZED),)
    std: torch.Tensor
    inputs_index: torch.Tensor
    static_index: torch.Tensor
    on_board: torch.Tensor

    def __init__(self, normalizer: Normalizer, *, hidden: int = 32, depth: int = 2, curves: int = 4) -> None:
        super().__init__()
        if len(QUANTILES) != 3 or QUANTILES[MEDIAN] != 0.5:
            raise ValueError(f"the surrogate predicts a lower quantile, the median and an upper one, not {QUANTILES}")
        self.register_buffer("mean", torch.as_tensor(normalizer.mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(normalizer.std, dtype=torch.float32).clone())
        for name, names in (("inputs", INPUTS), ("static", STATIC_CHANNELS)):
            self.register_buffer(f"{name}_index", torch.tensor([NORMALIZED.index(n) for n in names]), persistent=False)
        ago = torch.arange(HISTORY_STEPS - 1, -1, -1, dtype=torch.float32)  # steps before t0 of each history bin
        weights = [(1 - ago / INSULIN_ACTION_STEPS).clamp(min=0), (1 - ago / CARB_ACTION_STEPS).clamp(min=0),
                   (ago < RECENT_STEPS).float(), (ago < RECENT_STEPS).float()]  # fmt: skip
        self.register_buffer("on_board", torch.stack(weights), persistent=False)
        self.curves_per_input = curves
        context_in = HISTORY_STEPS * 2 + 1 + len(STATIC_CHANNELS) + ON_BOARD
        layers: list[nn.Module] = []
        for width_in in [context_in] + [hidden] * (depth - 1):
            layers += [nn.Linear(width_in, hidden), nn.LayerNorm(hidden), nn.GELU()]
        self.context = nn.Sequential(*layers)
        self.trend = nn.Linear(HISTORY_STEPS, HORIZON_STEPS, bias=False)
        self.change = nn.Linear(hidden, HORIZON_STEPS)
        self.curves = ResponseCurves(kinds=2, curves=curves)  # carbohydrate, insulin
        self.gain = nn.Linear(hidden, 2 * curves)
        self.width = nn.Linear(hidden, 2 * HORIZON_STEPS)
        self.width_plan = nn.Linear(HORIZON_STEPS // PLAN_BLOCK * len(FUTURE_CHANNELS), 2 * HORIZON_STEPS, bias=False)
        for head in (self.trend, self.change, self.gain):
            nn.init.zeros_(head.weight)
        nn.init.zeros_(self.change.bias)
        nn.init.constant_(self.gain.bias, math.log(math.expm1(1.0 / curves)))  # the curves' weights start at 1/curves

    def forward(self, history: torch.Tensor, future_inputs: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """Quantile forecasts in mg/dL for windows given in raw units (see models.twin.windows.Windows)."""
        return self.parts(history, future_inputs, static)[0]

    def parts(
        self, history: torch.Tensor, future_inputs: torch.Tensor, static: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The quantile forecasts and, (n, HORIZON_STEPS) in mg/dL, the carbohydrate and insulin effects in them.

        The median is the last reading plus a change with `carb_effect - insulin_effect` in it: the part of the
        forecast the window's doses (past and planned) make through the response curves, which
        `models.twin.personal` rescales per patient.
        """
        glucose_mean, glucose_std = self.mean[0], self.std[0]
        input_mean, input_std = self.mean[self.inputs_index], self.std[self.inputs_index]
        last = history[:, -1, CGM]
        trend = (history[..., CGM] - last[:, None]) / glucose_std
        scheduled = history[..., BASAL].mean(dim=1, keepdim=True)
        doses = torch.cat([history[..., BASAL:], future_inputs], dim=1)  # (n, RESPONSE_STEPS, 3)
        insulin = (doses[..., 1] + doses[..., 0] - scheduled) / input_std[1]
        carbs = doses[..., 2] / input_std[2]
        past_insulin, past_carbs = insulin[:, :HISTORY_STEPS], carbs[:, :HISTORY_STEPS]
        on_board = torch.stack([past_insulin @ self.on_board[0], past_carbs @ self.on_board[1],
                                past_insulin @ self.on_board[2], past_carbs @ self.on_board[3]], dim=1)  # fmt: skip
        features = torch.cat(
            [
                trend,
                ((last[:, None] - glucose_mean) / glucose_std).clamp(-5.0, 10.0),
                history[..., OBSERVED],
                ((static - self.mean[self.static_index]) / self.std[self.static_index]).clamp(-10.0, 10.0),
                on_board.clamp(-20.0, 20.0),
            ],
            dim=1,
        )
        context = self.context(features)

        effects = self.curves(torch.stack([carbs, insulin], dim=1))  # (n, 2, curves, HORIZON_STEPS)
        weights = F.softplus(self.gain(context)).view(-1, 2, self.curves_per_input, 1)
        carb_effect, insulin_effect = (effects * weights).sum(dim=2).unbind(dim=1)
        change = self.trend(trend) + self.change(context) + carb_effect - insulin_effect
        median = last[:, None] + change * glucose_std

        plan = ((future_inputs - input_mean) / input_std).view(-1, HORIZON_STEPS // PLAN_BLOCK, PLAN_BLOCK, 3)
        widths = F.softplus(self.width(context) + self.width_plan(plan.mean(dim=2).flatten(1))) * glucose_std
        quantiles = torch.stack([median - widths[:, :HORIZON_STEPS], median, median + widths[:, HORIZON_STEPS:]], dim=2)
        return quantiles, carb_effect * glucose_std, insulin_effect * glucose_std

    def normalizer(self) -> Normalizer:
        """The Normalizer the model was built with (e.g. to save beside state_arrays with to_dict)."""
        return Normalizer(mean=self.mean.double().numpy().copy(), std=self.std.double().numpy().copy())


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-window pinball (quantile) loss in mg/dL, shape (n,): mean over the window's observed target bins.

    `pred` is (n, HORIZON_STEPS, len(QUANTILES)), `target` (n, HORIZON_STEPS); bins where `mask` is False or the
    target is NaN count for nothing (and pass no NaN into gradients). A window without an observed bin has loss 0.
    Per-window losses let a DP trainer sum one patient's windows before clipping.
    """
    used = mask.bool() & ~torch.isnan(target)
    error = torch.where(used, target, torch.zeros_like(target))[..., None] - pred
    levels = torch.tensor(QUANTILES, dtype=pred.dtype, device=pred.device)
    loss = torch.maximum(levels * error, (levels - 1.0) * error).sum(dim=2)
    return (loss * used).sum(dim=1) / used.sum(dim=1).clamp(min=1)


def window_tensors(windows: Windows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """history, future_inputs, static and target of the windows as float32 tensors (target NaN where missing)."""
    return tuple(  # type: ignore[return-value]
        torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        for a in (windows.history, windows.future_inputs, windows.static, windows.target)
    )


def patient_batches(windows: Windows, *, pad: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """Each patient's windows as (history, future_inputs, static, target) tensors: one entry per patient, by id.

    This is the unit of patient-level DP (`federated.privacy.dp_step` takes one entry per sampled patient). With
    `pad`, every patient gets as many windows as the one with the most: the extra ones repeat the patient's last
    window with an all-NaN target, so `pinball_loss` gives them exactly 0 and they add nothing to the loss or its
    gradient, while equal shapes let `dp_step` compute all patients' gradients in one vmap instead of one backward
    pass each.
    """
    tensors = window_tensors(windows)
    people, counts = np.unique(windows.person_id, return_counts=True)
    order = np.argsort(windows.person_id, kind="stable")
    longest = int(counts.max()) if len(counts) else 0
    batches = []
    for start, count in zip(np.searchsorted(windows.person_id[order], people), counts, strict=True):
        rows = order[start : start + count]
        if pad and count < longest:
            rows = np.concatenate([rows, np.full(longest - count, rows[-1])])
        batch = [t[torch.from_numpy(rows)] for t in tensors]
        if pad and count < longest:
            batch[3][count:] = float("nan")
        batches.append(tuple(batch))
    return batches


def fit_local(model: TwinSurrogate, windows: Windows, *, epochs: int, lr: float, batch_size: int, seed: int) -> dict:
    """Train on one site's windows without privacy (baselines, tests); the same seed gives the same model.

    Adam on the mean per-window pinball loss, shuffled each epoch by a generator seeded with `seed`. Returns the
    mean training loss of each epoch and the number of windows and steps.
    """
    history, future_inputs, static, target = window_tensors(windows)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    epoch_loss, steps = [], 0
    for _ in range(epochs):
        total = 0.0
        for batch in _batches(len(windows), batch_size, generator):
            optimizer.zero_grad()
            pred = model(history[batch], future_inputs[batch], static[batch])
            loss = pinball_loss(pred, target[batch], ~torch.isnan(target[batch])).mean()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            steps += 1
        epoch_loss.append(total / max(len(windows), 1))
    model.eval()
    return {"epoch_loss": epoch_loss, "windows": len(windows), "steps": steps}


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering 0..n-1 once."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def predict(model: TwinSurrogate, windows: Windows, *, batch_size: int = 4096) -> np.ndarray:
    """Quantile forecasts (n, HORIZON_STEPS, len(QUANTILES)) in mg/dL, float64."""
    return predict_parts(model, windows, batch_size=batch_size)[0]


@torch.no_grad()
def predict_parts(
    model: TwinSurrogate, windows: Windows, *, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`TwinSurrogate.parts` in eval mode and in batches, as float64 arrays in mg/dL.

    The quantiles (n, HORIZON_STEPS, len(QUANTILES)), and the carbohydrate and insulin effects (n, HORIZON_STEPS).
    """
    history, future_inputs, static, _ = window_tensors(windows)
    was_training = model.training
    model.eval()
    parts = [
        model.parts(history[i : i + batch_size], future_inputs[i : i + batch_size], static[i : i + batch_size])
        for i in range(0, len(windows), batch_size)
    ]
    model.train(was_training)
    if not parts:
        return np.zeros((0, HORIZON_STEPS, len(QUANTILES))), np.zeros((0, HORIZON_STEPS)), np.zeros((0, HORIZON_STEPS))
    quantiles, carbs, insulin = (torch.cat([p[k] for p in parts]).double().numpy() for k in range(3))
    return quantiles, carbs, insulin


def state_arrays(model: nn.Module) -> list[np.ndarray]:
    """The trainable parameters as numpy arrays, in named_parameters order (what Flower ships)."""
    return [p.detach().cpu().numpy().copy() for p in model.parameters()]


def load_state_arrays(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Copy `arrays` (from state_arrays) into the model's parameters, checking count and shapes."""
    parameters = list(model.named_parameters())
    if len(arrays) != len(parameters):
        raise ValueError(f"got {len(arrays)} arrays for a model with {len(parameters)} parameter tensors")
    with torch.no_grad():
        for (name, parameter), array in zip(parameters, arrays, strict=True):
            if tuple(array.shape) != tuple(parameter.shape):
                raise ValueError(f"{name}: array of shape {array.shape}, parameter of shape {tuple(parameter.shape)}")
            parameter.copy_(torch.as_tensor(array, dtype=parameter.dtype))
