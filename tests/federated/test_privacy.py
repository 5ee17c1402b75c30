"""Patient-level DP-SGD and the site privacy ledger: plain training without privacy, exact clipping, noise, budget."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from federated.privacy import (
    BudgetExceeded,
    DPConfig,
    PrivacyLedger,
    dp_step,
    noise_for_budget,
    poisson_sample,
    train_private_round,
)

FEATURES = 5
PatientBatch = tuple[torch.Tensor, torch.Tensor]


def small_mlp(seed: int = 0) -> torch.nn.Module:
    """A two-layer MLP with a few hundred parameters."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def patients(windows: list[int], seed: int = 0, target_scale: float = 1.0) -> list[PatientBatch]:
    """One (inputs, targets) batch per patient, with the given number of windows each."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, FEATURES, generator=generator), target_scale * torch.randn(n, 1, generator=generator))
        for n in windows
    ]


def patient_loss(model: torch.nn.Module, batch: PatientBatch) -> torch.Tensor:
    """The patient's whole contribution: the sum of its window losses."""
    inputs, targets = batch
    return torch.nn.functional.mse_loss(model(inputs), targets, reduction="sum")


def config(noise_multiplier: float = 0.0, max_grad_norm: float = math.inf) -> DPConfig:
    """DP settings whose sample rate and delta do not matter to a single step."""
    return DPConfig(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, patient_sample_rate=0.5, delta=1e-5)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """All parameter gradients as one vector."""
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def take_dp_step(
    model: torch.nn.Module,
    batches: list[PatientBatch],
    dp: DPConfig,
    *,
    expected: float,
    vectorize: bool = True,
    lr: float = 0.5,
    seed: int = 0,
):  # type: ignore[no-untyped-def]
    """One dp_step with plain SGD; returns its StepStats."""
    return dp_step(
        model,
        batches,
        loss_fn=patient_loss,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        config=dp,
        generator=torch.Generator().manual_seed(seed),
        expected_patients=expected,
        vectorize=vectorize,
    )


@settings(max_examples=25, deadline=None)
@given(
    windows=st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=6),
    expected=st.floats(min_value=0.5, max_value=8.0),
    seed=st.integers(min_value=0, max_value=2**16),
    vectorize=st.booleans(),
)
def test_no_clipping_no_noise_is_plain_training(
    windows: list[int], expected: float, seed: int, vectorize: bool
) -> None:
    """With sigma=0 and C=inf a DP step is a plain SGD step on the sampled patients' summed loss / expected count."""
    batches = patients(windows, seed=seed)
    private, plain = small_mlp(seed), small_mlp(seed)
    stats = take_dp_step(private, batches, config(), expected=expected, vectorize=vectorize)

    optimizer = torch.optim.SGD(plain.parameters(), lr=0.5)
    if batches:  # an empty Poisson sample leaves plain SGD nothing to do, and the noiseless DP step adds zero
        (sum(patient_loss(plain, b) for b in batches) / expected).backward()  # type: ignore[operator]
        optimizer.step()

    for p_private, p_plain in zip(private.parameters(), plain.parameters(), strict=True):
        # atol 1e-6 plus float32 rounding (a few ulps) of parameters that can grow past 1 in one large step.
        torch.testing.assert_close(p_private, p_plain, atol=1e-6, rtol=2e-6)
    assert stats.n_patients == len(windows) and stats.n_clipped == 0
    if windows:
        assert not torch.equal(next(private.parameters()), next(small_mlp(seed).parameters()))


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_huge_patient_contributes_exactly_the_clip_norm(vectorize: bool) -> None:
    """A patient whose gradient is above C adds exactly norm C to the sum, and the optimizer sees C / (q N)."""
    model, huge = small_mlp(), patients([7], target_scale=1e3)
    stats = take_dp_step(model, huge, config(max_grad_norm=0.5), expected=4.0, vectorize=vectorize)
    assert stats.max_patient_grad_norm > 100 and stats.n_clipped == 1
    assert stats.summed_grad_norm == pytest.approx(0.5, rel=1e-5)
    assert float(flat_grad(model).norm()) == pytest.approx(0.5 / 4.0, rel=1e-5)

    ordinary = patients([7])
    norm = take_dp_step(small_mlp(), ordinary, config(), expected=1.0, vectorize=vectorize).summed_grad_norm
    just_over = take_dp_step(small_mlp(), ordinary, config(max_grad_norm=norm / 1.5), expected=1.0, vectorize=vectorize)
    assert just_over.summed_grad_norm == pytest.approx(norm / 1.5, rel=1e-6)


@pytest.mark.parametrize("vectorize", [True, False])
def test_clipping_is_per_patient_not_per_batch(vectorize: bool) -> None:
    """Two identical huge patients add 2C (each clipped alone); a patient under C is left as it is."""
    huge = patients([3], target_scale=1e3)
    stats = take_dp_step(small_mlp(), huge + huge, config(max_grad_norm=0.5), expected=2.0, vectorize=vectorize)
    assert stats.n_clipped == 2
    assert stats.summed_grad_norm == pytest.approx(1.0, rel=1e-5)

    small = patients([2], seed=1)
    unclipped = take_dp_step(small_mlp(), small, config(), expected=1.0, vectorize=vectorize)
    bound = 2 * unclipped.summed_grad_norm
    clipped = take_dp_step(small_mlp(), small, config(max_grad_norm=bound), expected=1.0, vectorize=vectorize)
    assert clipped.n_clipped == 0 and clipped.summed_grad_norm == pytest.approx(unclipped.summed_grad_norm, rel=1e-6)


def test_noise_std_is_sigma_c_over_expected_patients() -> None:
    """Over many steps the gradient minus its noiseless value has mean 0 and std sigma * C / (q N)."""
    sigma, clip, expected = 2.0, 0.5, 4.0
    batches = patients([3, 1, 5], seed=2)
    model = small_mlp()
    take_dp_step(model, batches, config(max_grad_norm=clip), expected=expected, lr=0.0)
    noiseless = flat_grad(model).clone()
    noise = []
    for seed in range(30):
        take_dp_step(model, batches, config(sigma, clip), expected=expected, lr=0.0, seed=seed)
        noise.append(flat_grad(model) - noiseless)
    take_dp_step(model, [], config(sigma, clip), expected=expected, lr=0.0, seed=99)  # nobody sampled: noise only
    noise.append(flat_grad(model))
    samples = torch.cat(noise)
    target = sigma * clip / expected
    assert float(samples.std()) == pytest.approx(target, rel=0.05)
    assert abs(float(samples.mean())) < 4 * target / math.sqrt(samples.numel())


def test_poisson_sampling_draws_each_patient_with_probability_q() -> None:
    """The sampled count averages q N, varies between steps, and the same seed gives the same sample."""
    generator = torch.Generator().manual_seed(5)
    counts = [len(poisson_sample(200, 0.1, generator)) for _ in range(300)]
    assert sum(counts) / len(counts) == pytest.approx(20, rel=0.05)
    assert len(set(counts)) > 5
    assert poisson_sample(50, 0.3, torch.Generator().manual_seed(1)) == poisson_sample(
        50, 0.3, torch.Generator().manual_seed(1)
    )


def test_private_round_takes_the_configured_steps() -> None:
    """train_private_round takes steps_per_round steps on Poisson samples and changes the model."""
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, patient_sample_rate=0.5, delta=1e-5, steps_per_round=4)
    model, before = small_mlp(), small_mlp()
    stats = train_private_round(
        model,
        patients([2, 3, 2, 4, 1, 2]),
        loss_fn=patient_loss,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config=dp,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(stats) == 4 and all(s.noise_std == 1.0 for s in stats)
    assert not torch.equal(next(model.parameters()), next(before.parameters()))


def test_running_statistics_are_refused() -> None:
    """A model that updates BatchNorm statistics from patient data outside DP-SGD is refused."""
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match="running statistics"):
        take_dp_step(model, patients([3]), config(), expected=1.0)


def ledger(path: Path, budget: float = 4.0) -> PrivacyLedger:
    """A site ledger at `path` with delta 1e-5."""
    return PrivacyLedger(path, site_id="lakeside", epsilon_budget=budget, delta=1e-5)


ROUND = {"noise_multiplier": 1.5, "sample_rate": 0.05, "steps": 20}  # epsilon 1.02 at delta 1e-5


def test_over_budget_round_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    """A round over the budget raises BudgetExceeded naming site, spent, planned and budget; nothing changes."""
    site = ledger(tmp_path / "ledger.json", budget=1.2)
    spent = site.record_round("run1:1", **ROUND)
    planned = site.epsilon_if(**ROUND)
    assert spent < 1.2 < planned
    before = (tmp_path / "ledger.json").read_text()
    with pytest.raises(BudgetExceeded) as refused:
        site.record_round("run1:2", **ROUND)
    message = str(refused.value)
    assert str(pickle.loads(pickle.dumps(refused.value))) == message  # survives a trip between processes
    assert "lakeside" in message and "run1:2" in message
    assert f"{spent:.4f}" in message and f"{planned:.4f}" in message and "1.2000" in message
    assert site.epsilon_spent() == spent and (tmp_path / "ledger.json").read_text() == before
    with pytest.raises(BudgetExceeded):
        site.check_round(**ROUND)


def test_ledger_never_exceeds_budget_and_only_grows(tmp_path: Path) -> None:
    """Across many attempted rounds epsilon never passes the budget and never decreases; some rounds are refused."""
    site = ledger(tmp_path / "ledger.json", budget=3.0)
    plans = [ROUND, {"noise_multiplier": 2.0, "sample_rate": 0.2, "steps": 15}, {**ROUND, "steps": 5}]
    spent, refusals = [site.epsilon_spent()], 0
    for attempt in range(24):
        try:
            site.record_round(f"run1:{attempt}", **plans[attempt % 3])
        except BudgetExceeded:
            refusals += 1
        spent.append(site.epsilon_spent())
        assert spent[-1] <= 3.0
    assert spent == sorted(spent) and spent[-1] > spent[0]
    assert refusals > 0 and site.summary()["rounds"] == 24 - refusals
    assert site.summary()["epsilon_remaining"] == pytest.approx(3.0 - spent[-1])


def test_ledger_persists_across_runs_as_one_accountant(tmp_path: Path) -> None:
    """Reopening gives the same epsilon, and rounds of two runs compose as if one run had taken them all."""
    path = tmp_path / "site" / "ledger.json"
    first = ledger(path)
    first.record_round("run1:1", **ROUND)
    reopened = ledger(path)
    assert reopened.epsilon_spent() == first.epsilon_spent() and reopened.summary() == first.summary()
    after_second_run = reopened.record_round("run2:1", noise_multiplier=2.0, sample_rate=0.2, steps=10)

    one_run = ledger(tmp_path / "one.json")
    one_run.record_round("a", **ROUND)
    assert after_second_run == one_run.record_round("b", noise_multiplier=2.0, sample_rate=0.2, steps=10)
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temporary file left behind


def test_retried_round_is_not_double_counted(tmp_path: Path) -> None:
    """Recording a round id again (a retry) changes nothing, even after reopening; other parameters are an error."""
    path = tmp_path / "ledger.json"
    site = ledger(path)
    once = site.record_round("run1:1", **ROUND)
    assert site.record_round("run1:1", **ROUND) == once
    assert ledger(path).record_round("run1:1", **ROUND) == once
    assert ledger(path).summary()["rounds"] == 1
    with pytest.raises(ValueError, match="already in privacy ledger"):
        site.record_round("run1:1", **{**ROUND, "steps": 21})


def test_ledger_epsilon_equals_a_fresh_opacus_accountant(tmp_path: Path) -> None:
    """The ledger's epsilon is what Opacus' RDPAccountant gives when stepped through the same rounds."""
    site = ledger(tmp_path / "ledger.json", budget=10.0)
    rounds = [ROUND, ROUND, {"noise_multiplier": 2.0, "sample_rate": 0.2, "steps": 7}, ROUND]
    accountant = RDPAccountant()
    for number, planned in enumerate(rounds):
        site.record_round(f"run1:{number}", **planned)
        for _ in range(planned["steps"]):
            accountant.step(noise_multiplier=planned["noise_multiplier"], sample_rate=planned["sample_rate"])
    assert site.epsilon_spent() == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
    assert [list(entry) for entry in accountant.history] == json.loads((tmp_path / "ledger.json").read_text())[
        "history"
    ]


def test_ledger_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename fails, the ledger on disk and in memory keep the old spend and no temporary file remains."""
    path = tmp_path / "ledger.json"
    site = ledger(path)
    spent = site.record_round("run1:1", **ROUND)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        site.record_round("run1:2", **ROUND)
    monkeypatch.undo()
    assert site.epsilon_spent() == spent and ledger(path).epsilon_spent() == spent
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_reopening_with_another_budget_is_refused(tmp_path: Path) -> None:
    """A ledger opened with a budget other than the one it records is refused, naming the file and field."""
    path = tmp_path / "ledger.json"
    ledger(path, budget=2.0)
    with pytest.raises(ValueError, match="epsilon_budget") as refused:
        ledger(path, budget=4.0)
    assert str(path) in str(refused.value)


def test_noise_for_budget_spends_the_budget(tmp_path: Path) -> None:
    """The noise multiplier found for a budget spends between 99% and 100% of it when accounted."""
    sigma = noise_for_budget(epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=50)
    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.1, 50)]
    assert 0.99 <= accountant.get_epsilon(delta=1e-5) <= 1.0
    site = ledger(tmp_path / "ledger.json", budget=1.0)
    assert site.record_round("run1:1", noise_multiplier=sigma, sample_rate=0.1, steps=50) <= 1.0


def test_fedprox_pull_is_added_after_the_noise_and_equals_the_proximal_gradient() -> None:
    """A noiseless step with proximal (mu, anchor) equals plain SGD on loss / expected + mu/2 * |w - anchor|^2."""
    batches = patients([2, 3, 1], seed=3)
    private, plain = small_mlp(1), small_mlp(1)
    anchor = [p.detach() + 0.3 for p in small_mlp(2).parameters()]  # some other global model
    mu = 0.7
    dp_step(private, batches, loss_fn=patient_loss, optimizer=torch.optim.SGD(private.parameters(), lr=0.5),
            config=config(), generator=torch.Generator().manual_seed(0), expected_patients=3.0,
            proximal=(mu, anchor))  # fmt: skip
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.5)
    proximal = sum(((p - a) ** 2).sum() for p, a in zip(plain.parameters(), anchor, strict=True))
    (sum(patient_loss(plain, b) for b in batches) / 3.0 + mu / 2 * proximal).backward()  # type: ignore[operator]
    optimizer.step()
    for p_private, p_plain in zip(private.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p_private, p_plain, atol=1e-6, rtol=2e-6)


def test_private_round_with_fedprox_stays_closer_to_the_start() -> None:
    """The same round (same samples, same noise) drifts less from the global model with a proximal pull."""
    batches = patients([3] * 6, seed=4, target_scale=5.0)
    start = torch.cat([p.detach().flatten() for p in small_mlp(5).parameters()])
    drift = {}
    for mu in (0.0, 2.0):
        model = small_mlp(5)
        dp = DPConfig(noise_multiplier=0.5, max_grad_norm=1.0, patient_sample_rate=0.5, delta=1e-5, steps_per_round=8)
        train_private_round(model, batches, loss_fn=patient_loss, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
                            config=dp, generator=torch.Generator().manual_seed(9), proximal_mu=mu)  # fmt: skip
        drift[mu] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())
    assert 0 < drift[2.0] < drift[0.0]
