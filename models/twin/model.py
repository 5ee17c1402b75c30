"""The twin surrogate: a small, Opacus-trainable network forecasting glucose quantiles 2 h ahead from a window.

Design, and why:

- The forecast is the last CGM plus a predicted change, so the network learns dynamics, not glucose levels.
- The change has two parts. A free part, from an MLP over the CGM history (relative to the last reading, with
  the observed mask) and the static covariates. And the effect of every insulin and carbohydrate dose in the
  window, the two hours before t0 as well as the two planned after it, through response curves that the MLP
  sets per window but that are positive and non-decreasing with time since the dose: insulin only pushes glucose
  down, carbohydrate only up, and neither wears off within the window's 4 h. Past doses act through the same
  curves as planned ones (the part of their effect still to come, as insulin on board), and basal counts as its
  deviation from the history's mean rate, so a steady basal schedule is neutral and a temporary one acts.
- So a what-if answer always has the physiological sign. Its size is learned, and from observational data it is
  confounded: boluses follow carbohydrate (by the patient's ratio) and high glucose (corrections), so a site's
  records cannot fully separate their effects; the learned sizes are smaller than the true ones.
- Quantiles are the median minus and plus softplus widths, so they never cross. Widths may depend on the plan
  too (a large meal ahead widens the interval).
- Only Linear, LayerNorm and GELU carry or touch parameters, and nothing mixes samples, so Opacus can compute
  per-sample gradients; it is ~50k parameters and fast on CPU.
- The Normalizer lives in buffers, so the model takes and returns raw units (mg/dL, U, g). `state_arrays` holds
  only trainable parameters: that is what federated averaging and DP noise should touch.
"""

from __future__ import annotations

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
INPUTS = HISTORY_CHANNELS[2:]  # basal_u, bolus_u, carbs_g
if INPUTS != FUTURE_CHANNELS:
    raise ImportError(f"history inputs {INPUTS} and planned inputs {FUTURE_CHANNELS} must be in the same order")
MEDIAN = QUANTILES.index(0.5)
# Response curves start with increments of softplus(RESPONSE_BIAS) ~ 0.007 normalized units per step, so a meal
# bolus first moves the forecast by tens of mg/dL over 2 h, a sane start from which training scales the curves.
RESPONSE_BIAS = -5.0
RESPONSE_STEPS = HISTORY_STEPS + HORIZON_STEPS  # doses from the whole window: 2 h before t0 and 2 h planned


class TwinSurrogate(nn.Module):
    """Forecast CGM quantiles (n, HORIZON_STEPS, len(QUANTILES)) in mg/dL from raw history, plan and covariates."""

    mean: torch.Tensor  # Normalizer buffers, (len(NORMALIZED),)
    std: torch.Tensor
    inputs_index: torch.Tensor
    static_index: torch.Tensor
    until_target: torch.Tensor
    until_t0: torch.Tensor

    def __init__(self, normalizer: Normalizer, *, hidden: int = 128, depth: int = 2) -> None:
        super().__init__()
        if len(QUANTILES) != 3 or QUANTILES[MEDIAN] != 0.5:
            raise ValueError(f"the surrogate predicts a lower quantile, the median and an upper one, not {QUANTILES}")
        self.register_buffer("mean", torch.as_tensor(normalizer.mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(normalizer.std, dtype=torch.float32).clone())
        for name, names in (("inputs", INPUTS), ("static", STATIC_CHANNELS)):
            self.register_buffer(f"{name}_index", torch.tensor([NORMALIZED.index(n) for n in names]), persistent=False)
        context_in = HISTORY_STEPS * 2 + 1 + len(STATIC_CHANNELS)
        layers: list[nn.Module] = []
        for width_in in [context_in] + [hidden] * (depth - 1):
            layers += [nn.Linear(width_in, hidden), nn.LayerNorm(hidden), nn.GELU()]
        self.context = nn.Sequential(*layers)
        self.change = nn.Linear(hidden, HORIZON_STEPS)
        self.response = nn.Linear(hidden, 2 * RESPONSE_STEPS)  # insulin and carbohydrate curve increments
        self.width = nn.Linear(hidden, 2 * HORIZON_STEPS)
        self.width_plan = nn.Linear(HORIZON_STEPS * len(FUTURE_CHANNELS), 2 * HORIZON_STEPS, bias=False)
        nn.init.constant_(self.response.bias, RESPONSE_BIAS)
        # Dose d of the 48 (history then plan) sits at step s = d - 23 from t0's bin; target t (1..24) gains
        # curve(t - s) - curve(-s) from it: what the dose does between t0 and t. Column 0 of the padded curve is 0.
        dose_step = torch.arange(RESPONSE_STEPS) - (HISTORY_STEPS - 1)
        target_step = torch.arange(1, HORIZON_STEPS + 1)[:, None]
        self.register_buffer("until_target", (target_step - dose_step + 1).clamp(min=0), persistent=False)
        self.register_buffer("until_t0", (-dose_step + 1).clamp(min=0).expand(HORIZON_STEPS, -1), persistent=False)

    def forward(self, history: torch.Tensor, future_inputs: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """Quantile forecasts in mg/dL for windows given in raw units (see models.twin.windows.Windows)."""
        glucose_mean, glucose_std = self.mean[0], self.std[0]
        input_mean, input_std = self.mean[self.inputs_index], self.std[self.inputs_index]
        last = history[:, -1, CGM]
        features = torch.cat(
            [
                (history[..., CGM] - last[:, None]) / glucose_std,
                ((last[:, None] - glucose_mean) / glucose_std).clamp(-5.0, 10.0),
                history[..., OBSERVED],
                ((static - self.mean[self.static_index]) / self.std[self.static_index]).clamp(-10.0, 10.0),
            ],
            dim=1,
        )
        context = self.context(features)

        doses = torch.cat([history[..., 2:], future_inputs], dim=1)  # (n, RESPONSE_STEPS, 3)
        scheduled = history[..., 2].mean(dim=1, keepdim=True)
        insulin = (doses[..., 1] + doses[..., 0] - scheduled) / input_std[1]
        carbs = doses[..., 2] / input_std[2]
        curves = torch.cumsum(F.softplus(self.response(context)), dim=1)
        effect = self._effect(curves[:, RESPONSE_STEPS:], carbs) - self._effect(curves[:, :RESPONSE_STEPS], insulin)
        median = last[:, None] + (self.change(context) + effect) * glucose_std

        plan = ((future_inputs - input_mean) / input_std).flatten(1)
        widths = F.softplus(self.width(context) + self.width_plan(plan)) * glucose_std
        return torch.stack([median - widths[:, :HORIZON_STEPS], median, median + widths[:, HORIZON_STEPS:]], dim=2)

    def normalizer(self) -> Normalizer:
        """The Normalizer the model was built with (e.g. to save beside state_arrays with to_dict)."""
        return Normalizer(mean=self.mean.double().numpy().copy(), std=self.std.double().numpy().copy())

    def _effect(self, curve: torch.Tensor, dose: torch.Tensor) -> torch.Tensor:
        """Glucose change from t0 to each target step caused by the doses, normalized units, (n, HORIZON_STEPS)."""
        padded = F.pad(curve, (1, 0))
        response = padded[:, self.until_target] - padded[:, self.until_t0]  # (n, HORIZON_STEPS, RESPONSE_STEPS)
        return torch.einsum("ntd,nd->nt", response, dose)


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


@torch.no_grad()
def predict(model: TwinSurrogate, windows: Windows, *, batch_size: int = 4096) -> np.ndarray:
    """Quantile forecasts (n, HORIZON_STEPS, len(QUANTILES)) in mg/dL, float64."""
    history, future_inputs, static, _ = window_tensors(windows)
    was_training = model.training
    model.eval()
    parts = [
        model(history[i : i + batch_size], future_inputs[i : i + batch_size], static[i : i + batch_size])
        for i in range(0, len(windows), batch_size)
    ]
    model.train(was_training)
    if not parts:
        return np.zeros((0, HORIZON_STEPS, len(QUANTILES)))
    return torch.cat(parts).double().numpy()


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
