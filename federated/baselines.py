"""What federated training is measured against: persistence, each hospital alone, and all data in one place.

Every method uses the same patient split (`models.twin.split_patients`: about 70% train, 10% calibration, 20%
test by pseudonymous person id at each site), is trained on the train patients only and scored on the test
patients (see `federated.evaluation`).

- persistence: the last CGM reading, carried forward to every horizon. No training, no interval.
- local-only: each site trains its own model on its own train patients, with a Normalizer fitted on its own
  windows, and is scored on its own test patients. What a hospital gets without federating.
- pooled: one model on every site's train patients at once, with the Normalizer of the summed moments (the same
  one the federation builds). Non-private: what one would get with all the data in one place.

Budget rule, the same for both trained baselines: `fit_local` (Adam, pinball loss) with one `TrainingBudget`
(epochs, learning rate, batch size, seed). A budget is a number of passes over the method's own training windows:
a local-only site with a third of the windows takes a third of the pooled model's steps, as it would in practice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from models.twin import (
    HORIZON_STEPS,
    Normalizer,
    PatientSplit,
    TwinSurrogate,
    Windows,
    fit_local,
    window_moments,
)


@dataclass(frozen=True)
class TrainingBudget:
    """How every non-private baseline trains: `fit_local` with these settings."""

    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 256
    seed: int = 0


def persistence(windows: Windows) -> np.ndarray:
    """The last CGM reading as the forecast for every horizon, (n, HORIZON_STEPS) mg/dL."""
    return np.repeat(windows.last_cgm.astype(np.float64)[:, None], HORIZON_STEPS, axis=1)


def concat_windows(parts: Sequence[Windows]) -> Windows:
    """Several sites' windows as one set (for the pooled baseline: data that, in practice, cannot be pooled)."""
    return Windows(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Windows)})


def train_model(normalizer: Normalizer, windows: Windows, budget: TrainingBudget) -> tuple[TwinSurrogate, dict]:
    """A fresh TwinSurrogate (initialized from the budget's seed) trained on `windows` with `fit_local`."""
    torch.manual_seed(budget.seed)
    model = TwinSurrogate(normalizer)
    history = fit_local(
        model, windows, epochs=budget.epochs, lr=budget.lr, batch_size=budget.batch_size, seed=budget.seed
    )
    return model, history


def local_only(splits: Mapping[str, PatientSplit], budget: TrainingBudget) -> dict[str, tuple[TwinSurrogate, dict]]:
    """One model per site, each trained on that site's train patients with that site's own Normalizer."""
    return {site: train_model(Normalizer.fit(split.train), split.train, budget) for site, split in splits.items()}


def pooled(splits: Mapping[str, PatientSplit], budget: TrainingBudget) -> tuple[TwinSurrogate, dict]:
    """One model trained on every site's train patients, normalized by the sites' summed moments."""
    trains = [split.train for split in splits.values()]
    moments = window_moments(trains[0])
    for train in trains[1:]:
        moments = moments + window_moments(train)
    return train_model(Normalizer.fit_from_moments(moments), concat_windows(trains), budget)
