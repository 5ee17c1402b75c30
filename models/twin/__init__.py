"""Learned glucose twin: forecast windows from a site's features, the quantile surrogate, its conformal calibration.

`windows` cuts FeatureSet grids into (history, planned inputs, static, target) windows and scales them;
`model` is the Opacus-compatible surrogate with its loss, plain training and array round trip for Flower;
`conformal` calibrates its prediction intervals on a site's held-out patients.
"""

from models.twin.conformal import Calibration, apply, calibrate, coverage
from models.twin.model import (
    TwinSurrogate,
    fit_local,
    load_state_arrays,
    patient_batches,
    pinball_loss,
    predict,
    state_arrays,
    window_tensors,
)
from models.twin.windows import (
    FUTURE_CHANNELS,
    HISTORY_CHANNELS,
    HISTORY_STEPS,
    HORIZON_STEPS,
    QUANTILES,
    STATIC_CHANNELS,
    STATIC_FEATURES,
    Moments,
    Normalizer,
    PatientSplit,
    Windows,
    build_windows,
    split_patients,
    window_moments,
)

__all__ = [
    "FUTURE_CHANNELS",
    "HISTORY_CHANNELS",
    "HISTORY_STEPS",
    "HORIZON_STEPS",
    "QUANTILES",
    "STATIC_CHANNELS",
    "STATIC_FEATURES",
    "Calibration",
    "Moments",
    "Normalizer",
    "PatientSplit",
    "TwinSurrogate",
    "Windows",
    "apply",
    "build_windows",
    "calibrate",
    "coverage",
    "fit_local",
    "load_state_arrays",
    "patient_batches",
    "pinball_loss",
    "predict",
    "split_patients",
    "state_arrays",
    "window_moments",
    "window_tensors",
]
