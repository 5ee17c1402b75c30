"""Baselines on a tiny generated site: pooled over one site is its local model; trained beats persistence."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_sites import ingested_features

from federated.baselines import TrainingBudget, concat_windows, local_only, persistence, pooled
from federated.evaluation import horizon_index, load_truth, rmse, truth_at_targets
from federated.privacy import DPConfig, dp_step
from models.twin import (
    HORIZON_STEPS,
    Normalizer,
    PatientSplit,
    TwinSurrogate,
    build_windows,
    patient_batches,
    pinball_loss,
    predict,
    split_patients,
    state_arrays,
)

SITE = "lakeside"
BUDGET = TrainingBudget(epochs=20, lr=3e-3, batch_size=128, seed=0)


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PatientSplit]:
    """A 12-patient, 3-day Lakeside through ingestion and features, split by patient; its secret kept for truth."""
    folder = tmp_path_factory.mktemp("baselines")
    features = ingested_features(folder, SITE, patients=12, days=3)
    return folder, split_patients(build_windows(features))


def test_persistence_carries_the_last_reading(tiny_site: tuple[Path, PatientSplit]) -> None:
    """Persistence forecasts the last CGM at every horizon."""
    _, split = tiny_site
    forecast = persistence(split.test)
    assert forecast.shape == (len(split.test), HORIZON_STEPS)
    assert (forecast == split.test.last_cgm[:, None]).all()


def test_pooled_over_one_site_is_that_sites_local_model(tiny_site: tuple[Path, PatientSplit], one_thread: None) -> None:
    """With one site, summed moments are that site's moments and pooling changes nothing: the same weights."""
    _, split = tiny_site
    budget = TrainingBudget(epochs=1, lr=1e-3, batch_size=256, seed=3)
    alone, _ = local_only({SITE: split}, budget)[SITE]
    together, _ = pooled({SITE: split}, budget)
    for a, b in zip(state_arrays(alone), state_arrays(together), strict=True):
        np.testing.assert_array_equal(a, b)
    both = concat_windows([split.train, split.test])
    assert len(both) == len(split.train) + len(split.test)
    np.testing.assert_array_equal(both.person_id[len(split.train) :], split.test.person_id)


def test_trained_baseline_beats_persistence_on_true_glucose(
    tiny_site: tuple[Path, PatientSplit], one_thread: None
) -> None:
    """Trained on 8 patients, the local model's 30-minute median is closer to true glucose than persistence is."""
    folder, split = tiny_site
    truth = truth_at_targets(split.test, load_truth(folder, SITE))
    model, history = local_only({SITE: split}, BUDGET)[SITE]
    k = horizon_index(30)
    model_rmse = rmse(predict(model, split.test)[:, k, 1], truth[:, k])
    persistence_rmse = rmse(persistence(split.test)[:, k], truth[:, k])
    print(f"RMSE30 against truth: local {model_rmse:.1f}, persistence {persistence_rmse:.1f} mg/dL")
    assert history["epoch_loss"][-1] < history["epoch_loss"][0]
    assert model_rmse < persistence_rmse


def test_padded_patients_without_noise_or_clipping_take_the_plain_step(
    tiny_site: tuple[Path, PatientSplit], one_thread: None
) -> None:
    """dp_step on padded patient batches (one vmap) with no noise and no clipping equals plain SGD on their windows."""
    _, split = tiny_site
    torch.manual_seed(0)
    private = TwinSurrogate(Normalizer.fit(split.train))
    plain = TwinSurrogate(private.normalizer())
    plain.load_state_dict(private.state_dict())
    padded = patient_batches(split.train, pad=True)
    assert len({b[0].shape for b in padded}) == 1 and sum(b[0].shape[0] for b in padded) > len(split.train)

    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        history, future, static, target = batch
        return pinball_loss(model(history, future, static), target, ~torch.isnan(target)).sum()

    config = DPConfig(noise_multiplier=0.0, max_grad_norm=math.inf, patient_sample_rate=1.0, delta=1e-5)
    dp_step(private, padded, loss_fn=loss_fn, optimizer=torch.optim.SGD(private.parameters(), lr=1e-4),
            config=config, generator=torch.Generator().manual_seed(0), expected_patients=len(padded))  # fmt: skip
    optimizer = torch.optim.SGD(plain.parameters(), lr=1e-4)
    unpadded = [torch.cat(parts) for parts in zip(*patient_batches(split.train), strict=True)]
    (loss_fn(plain, tuple(unpadded)) / len(padded)).backward()
    optimizer.step()
    for (name, a), b in zip(private.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
