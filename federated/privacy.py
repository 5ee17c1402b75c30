"""Patient-level DP-SGD for one hospital and the ledger that keeps each hospital inside its privacy budget.

The guarantee
-------------
Training at a site that uses :func:`train_private_round` (or :func:`poisson_sample` + :func:`dp_step`) and
records every round in its :class:`PrivacyLedger` is (epsilon, delta)-differentially private with respect to
adding or removing ONE PATIENT'S ENTIRE DATA at that site: every window of that patient, in every round and
every run the site took part in. ``epsilon`` is what :meth:`PrivacyLedger.epsilon_spent` reports and ``delta``
is the ledger's delta. It rests on:

* the unit: each step Poisson-samples patients (each independently with probability ``q``), not windows;
* the sensitivity: a patient's whole gradient contribution (the gradient of the SUM of that patient's window
  losses) is clipped to L2 norm ``C`` over all parameters, so adding or removing a patient moves the sum of
  clipped gradients by at most ``C``;
* the noise: N(0, sigma^2 C^2) per coordinate added to that sum, which is then divided by the data-independent
  EXPECTED number of sampled patients ``q * N`` (dividing by the realised count would leak it);
* the accounting: Opacus' RDP accountant for the sampled Gaussian mechanism, composed over one history that
  spans all rounds and runs of the site (the ledger persists it; no new accountant per round).

What it does not cover
----------------------
* It is per site. A person treated at k hospitals is k patients; their combined loss is bounded by basic
  composition (sum of the epsilons and deltas of those sites).
* It is patient-level only if each person appears under exactly one ``person_id`` at the site; a patient
  split across two ids gets (roughly) twice the epsilon.
* Only what flows through the clipped, noised gradient is protected. Anything else a site sends (training
  loss, :class:`StepStats`, patient counts, metrics on local data) is NOT private and must not leave the
  site, and the model must not keep data-dependent state outside its gradients (BatchNorm running
  statistics are refused by :func:`dp_step`).
* Whatever is done with the released model afterwards is post-processing and costs no further privacy;
  it also gains none back.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

Batch = TypeVar("Batch")
"""One patient's data (e.g. a tuple of tensors of that patient's windows); only ``loss_fn`` looks inside."""

LEDGER_FORMAT = 1


@dataclass(frozen=True)
class DPConfig:
    """Patient-level DP-SGD settings of one site for one round."""

    noise_multiplier: float
    """sigma: noise std as a multiple of ``max_grad_norm``; 0 disables noise (and privacy)."""
    max_grad_norm: float
    """C: bound on the L2 norm of one patient's whole gradient; ``math.inf`` disables clipping."""
    patient_sample_rate: float
    """q: probability that a patient is sampled in a step (Poisson sampling, independently per patient)."""
    delta: float
    """Target delta; choose well below 1 / (number of patients at the site)."""
    steps_per_round: int = 1
    """DP-SGD steps a site takes in one federated round; the ledger records this many."""

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (math.inf disables clipping), got {self.max_grad_norm}")
        if self.noise_multiplier > 0 and math.isinf(self.max_grad_norm):
            raise ValueError("noise needs a finite max_grad_norm: the noise std is noise_multiplier * max_grad_norm")
        _check_sample_rate(self.patient_sample_rate)
        _check_delta(self.delta)
        _check_steps(self.steps_per_round)


@dataclass(frozen=True)
class StepStats:
    """Diagnostics of one DP step. They are computed from raw patient data: log them at the site, never send them."""

    n_patients: int
    """Patients sampled in this step."""
    n_clipped: int
    """Patients whose gradient norm exceeded ``max_grad_norm`` and was scaled down to it."""
    mean_patient_grad_norm: float
    """Mean L2 norm of the patients' gradients before clipping (nan when no patient was sampled)."""
    max_patient_grad_norm: float
    """Largest L2 norm of a patient's gradient before clipping (0 when no patient was sampled)."""
    summed_grad_norm: float
    """L2 norm of the sum of the clipped patient gradients, before noise and before dividing."""
    noise_std: float
    """Std of the noise added per coordinate to that sum: ``noise_multiplier * max_grad_norm``."""
    loss_sum: float
    """Sum over the sampled patients of their total loss."""


def poisson_sample(n_patients: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """Indices of the patients sampled in one step: each of ``n_patients`` independently with probability q.

    The batch size is random (possibly 0); that randomness is what the accountant's amplification assumes.
    """
    _check_sample_rate(sample_rate)
    draws = torch.rand(n_patients, generator=generator, device=generator.device)
    return torch.nonzero(draws < sample_rate).flatten().tolist()


def dp_step(
    model: torch.nn.Module,
    patient_batches: Sequence[Batch],
    *,
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    config: DPConfig,
    generator: torch.Generator,
    expected_patients: float,
    vectorize: bool = True,
    proximal: tuple[float, Sequence[torch.Tensor]] | None = None,
) -> StepStats:
    """Take one patient-level DP-SGD step on the sampled patients' data and return site-local diagnostics.

    ``patient_batches`` holds one entry per SAMPLED patient (see :func:`poisson_sample`) with all of that
    patient's windows; a patient must never be split across entries. ``loss_fn(model, batch)`` returns the SUM
    of the patient's window losses as a scalar tensor: the patient's whole contribution. Each patient's gradient
    is clipped to L2 norm ``config.max_grad_norm`` over all trainable parameters, the clipped gradients are
    summed, N(0, (noise_multiplier * max_grad_norm)^2) noise is added per coordinate, and the result is divided
    by ``expected_patients`` = q * N (a constant; dividing by the realised count would leak it), set as ``.grad``
    and handed to ``optimizer.step()``. The noise comes from ``generator`` (on the parameters' device): in a real
    round seed it from a cryptographic source (``secrets.randbits``); noise anyone can regenerate protects nobody.

    With ``noise_multiplier=0`` and ``max_grad_norm=math.inf`` this is exactly one optimizer step on
    ``sum(loss_fn(model, b) for b in patient_batches) / expected_patients``.

    With ``vectorize`` the gradients of patients whose batches are tensors (or tuples, lists, dicts of them) of
    identical shapes are computed together with ``torch.func.vmap``; ``loss_fn`` must then be vmap-compatible
    (no ``.item()``, no data-dependent Python branching). Other patients, or all with ``vectorize=False``, get
    one backward pass each. Both give the same result up to float rounding. Padding ragged patients to a few
    window counts with windows whose loss is 0 (masked targets) lets them share a vmap.

    ``proximal = (mu, anchor)`` adds FedProx's pull ``mu * (w - anchor)`` toward the round's global model (one
    tensor per trainable parameter, in ``named_parameters`` order) to the privatized gradient. It depends on no
    patient's data, so adding it after the noise spends no privacy.
    """
    if not expected_patients > 0:
        raise ValueError(f"expected_patients must be > 0 (q * number of patients), got {expected_patients}")
    _refuse_running_stats(model)
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    summed = [torch.zeros_like(p) for p in named.values()]
    norms: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    for group in _patient_groups(patient_batches, vectorize, sum(p.numel() for p in named.values())):
        batches = [patient_batches[i] for i in group]
        if len(group) == 1:
            grads, loss = _patient_grads(model, loss_fn, named, batches[0])
        else:
            grads, loss = _vectorized_grads(model, loss_fn, named, batches)
        group_norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1), dim=1)
        if not bool(torch.isfinite(group_norms).all()):
            raise FloatingPointError(f"a patient's gradient is not finite (sampled patients #{group})")
        # Exact min(1, C / norm), unlike Opacus' C / (norm + 1e-6): a patient's contribution is at most C.
        factors = torch.where(group_norms > config.max_grad_norm, config.max_grad_norm / group_norms, 1.0)
        for total, grad in zip(summed, grads, strict=True):
            total.add_(torch.tensordot(factors.to(grad.dtype), grad, dims=1))
        norms.append(group_norms)
        losses.append(loss)
    summed_grad_norm = float(torch.linalg.vector_norm(torch.stack([t.norm() for t in summed]))) if summed else 0.0
    noise_std = config.noise_multiplier * config.max_grad_norm
    for p, total in zip(named.values(), summed, strict=True):
        if noise_std > 0:
            total.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device), alpha=noise_std)
        p.grad = total.div_(expected_patients)
    if proximal is not None:
        mu, anchor = proximal
        for p, a in zip(named.values(), anchor, strict=True):
            p.grad = p.grad + mu * (p.detach() - a) if p.grad is not None else mu * (p.detach() - a)
    optimizer.step()
    all_norms = torch.cat(norms).tolist() if norms else []
    return StepStats(
        n_patients=len(all_norms),
        n_clipped=sum(norm > config.max_grad_norm for norm in all_norms),
        mean_patient_grad_norm=sum(all_norms) / len(all_norms) if all_norms else math.nan,
        max_patient_grad_norm=max(all_norms, default=0.0),
        summed_grad_norm=summed_grad_norm,
        noise_std=noise_std,
        loss_sum=float(torch.cat(losses).sum()) if losses else 0.0,
    )


def train_private_round(
    model: torch.nn.Module,
    patients: Sequence[Batch],
    *,
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    config: DPConfig,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
) -> list[StepStats]:
    """Run ``config.steps_per_round`` DP steps, each on a fresh Poisson sample of ``patients`` (one entry each).

    This is the round :meth:`PrivacyLedger.record_round` accounts for with ``config.noise_multiplier``,
    ``config.patient_sample_rate`` and ``config.steps_per_round``; record it BEFORE training, so a crash
    between training and recording can never release an unaccounted update.

    With ``proximal_mu > 0`` every step is pulled toward the parameters the round started from (FedProx).
    """
    if not patients:
        raise ValueError("a private round needs at least one patient at the site")
    expected = config.patient_sample_rate * len(patients)
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    proximal = (proximal_mu, anchor) if proximal_mu > 0 else None
    stats = []
    for _ in range(config.steps_per_round):
        sampled = [patients[i] for i in poisson_sample(len(patients), config.patient_sample_rate, generator)]
        stats.append(
            dp_step(
                model,
                sampled,
                loss_fn=loss_fn,
                optimizer=optimizer,
                config=config,
                generator=generator,
                expected_patients=expected,
                proximal=proximal,
            )
        )
    return stats


def noise_for_budget(*, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 0.5% of epsilon) with which ``steps`` steps at ``sample_rate`` spend <= epsilon.

    Wraps Opacus' ``get_noise_multiplier`` with the RDP accountant, which the ledger uses too.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    try:
        with warnings.catch_warnings():
            # The search tries large sigmas whose best RDP order is the largest one; Opacus warns at each of them.
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                    # Opacus' tolerance is absolute (default 0.01): far too loose for a budget of, say, 0.5.
                    epsilon_tolerance=0.005 * epsilon,
                )
            )
    except ValueError as error:
        raise ValueError(
            f"no noise multiplier up to 1e6 keeps {steps} steps at sample rate {sample_rate} within "
            f"epsilon={epsilon}, delta={delta}: take fewer steps or a lower sample rate ({error})"
        ) from error


class BudgetExceeded(RuntimeError):
    """A planned round would take a site past its privacy budget; the site must refuse it."""

    def __init__(self, *, site_id: str, round_id: str | None, spent: float, planned: float, budget: float) -> None:
        self.site_id, self.round_id = site_id, round_id
        self.spent, self.planned, self.budget = spent, planned, budget
        which = f"round {round_id!r}" if round_id is not None else "the planned round"
        super().__init__(
            f"site {site_id!r} refuses {which}: it would raise epsilon spent from {spent:.4f} to {planned:.4f}, "
            f"over this site's budget of {budget:.4f} (remaining {max(budget - spent, 0.0):.4f}). Take fewer "
            "steps or a lower patient sample rate, or raise the noise multiplier; if the budget is used up, "
            "this site can take no further part in training."
        )

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Keyword-only fields: the default (cls, args) pickling would fail when a simulation ships the error.
        rebuild = functools.partial(
            BudgetExceeded,
            site_id=self.site_id,
            round_id=self.round_id,
            spent=self.spent,
            planned=self.planned,
            budget=self.budget,
        )
        return rebuild, ()


class PrivacyLedger:
    """A site's cumulative privacy spend, persisted as JSON so one accountant spans all rounds and runs.

    The file holds the site id, its budget (epsilon_budget, delta), the RDP accountant's history (a list of
    (noise_multiplier, sample_rate, steps), as in Opacus' ``RDPAccountant.history``) and one entry per recorded
    round. Epsilon is always recomputed from the whole history. A round is recorded only if the epsilon after
    it stays within the budget, so the ledger never exceeds it. Every change is written to a temporary file
    and renamed over the ledger, so a crash leaves the old ledger or the new one, never a torn one. One
    process (the site's client) writes a ledger; two writers on one file are not supported.

    Opening an existing ledger with a different site id, budget or delta is refused: the recorded values are
    the site's commitments, and changing them is a deliberate edit of the file, not a configuration slip.
    """

    def __init__(self, path: Path | str, *, site_id: str, epsilon_budget: float, delta: float) -> None:
        if not epsilon_budget > 0:
            raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget}")
        _check_delta(delta)
        self.path = Path(path)
        self.site_id, self.epsilon_budget, self.delta = site_id, float(epsilon_budget), float(delta)
        self._history: list[tuple[float, float, int]] = []
        self._rounds: list[dict[str, Any]] = []
        if self.path.exists():
            self._load()
        else:
            self._save(self._history, self._rounds)

    def epsilon_spent(self) -> float:
        """Epsilon spent so far at this ledger's delta, over every recorded round of every run."""
        return _epsilon(self._history, self.delta)

    def epsilon_if(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the site would have spent after a planned round, without recording it."""
        _check_round_params(noise_multiplier, sample_rate, steps)
        return _epsilon(_extend(self._history, noise_multiplier, sample_rate, steps), self.delta)

    def check_round(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, round_id: str | None = None
    ) -> float:
        """Epsilon after the planned round; raises :class:`BudgetExceeded` if that is over the budget."""
        planned = self.epsilon_if(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if not planned <= self.epsilon_budget:
            raise BudgetExceeded(
                site_id=self.site_id,
                round_id=round_id,
                spent=self.epsilon_spent(),
                planned=planned,
                budget=self.epsilon_budget,
            )
        return planned

    def record_round(self, round_id: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record a round (refusing it like :meth:`check_round`) and return epsilon spent after it.

        Call it before the round's training starts. ``round_id`` must be unique across runs, e.g.
        ``f"{run_id}:{server_round}"`` (a bare server round number repeats in the next run). Recording an id
        again with the same parameters is a retry and changes nothing; with other parameters it is an error.
        """
        round_id = str(round_id)
        entry = {"noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate), "steps": int(steps)}
        previous = next((r for r in self._rounds if r["round_id"] == round_id), None)
        if previous is not None:
            if {key: previous[key] for key in entry} != entry:
                raise ValueError(
                    f"round {round_id!r} is already in privacy ledger {self.path} with "
                    f"{ {key: previous[key] for key in entry} }, not {entry}; a retried round must repeat its "
                    "parameters, a new round needs a new round_id"
                )
            return self.epsilon_spent()
        epsilon = self.check_round(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, round_id=round_id
        )
        history = _extend(self._history, noise_multiplier, sample_rate, steps)
        rounds = [*self._rounds, {"round_id": round_id, **entry, "epsilon_after": epsilon}]
        self._save(history, rounds)  # Only a ledger safely on disk counts; memory follows the file.
        self._history, self._rounds = history, rounds
        return epsilon

    def summary(self) -> dict[str, float | int | str]:
        """Flat, reply-ready account of the site's privacy: unit, epsilon spent, delta, budget, remaining, rounds."""
        spent = self.epsilon_spent()
        return {
            "site_id": self.site_id,
            "privacy_unit": "patient",
            "accountant": RDPAccountant.mechanism(),
            "epsilon_spent": spent,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "epsilon_remaining": max(self.epsilon_budget - spent, 0.0),
            "rounds": len(self._rounds),
        }

    def _load(self) -> None:
        try:
            state = json.loads(self.path.read_text())
            if state["format"] != LEDGER_FORMAT or state["mechanism"] != RDPAccountant.mechanism():
                raise ValueError(f"format {state['format']}/{state['mechanism']}, expected {LEDGER_FORMAT}/rdp")
            recorded = (state["site_id"], float(state["epsilon_budget"]), float(state["delta"]))
            history = [(float(sigma), float(q), int(steps)) for sigma, q, steps in state["history"]]
            rounds = [dict(r) for r in state["rounds"]]
            replayed: list[tuple[float, float, int]] = []
            for r in rounds:
                replayed = _extend(replayed, r["noise_multiplier"], r["sample_rate"], r["steps"])
            if replayed != history:
                raise ValueError("its history does not match its rounds")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"privacy ledger {self.path} is unreadable ({error}); restore it from backup") from error
        configured = (self.site_id, self.epsilon_budget, self.delta)
        for field, wanted, stored in zip(("site_id", "epsilon_budget", "delta"), configured, recorded, strict=True):
            if wanted != stored:
                raise ValueError(
                    f"privacy ledger {self.path} records {field}={stored!r} but this site is configured with "
                    f"{wanted!r}; configure {stored!r}, or edit {field} in the ledger deliberately"
                )
        self._history, self._rounds = history, rounds

    def _save(self, history: list[tuple[float, float, int]], rounds: list[dict[str, Any]]) -> None:
        state = {
            "format": LEDGER_FORMAT,
            "mechanism": RDPAccountant.mechanism(),
            "site_id": self.site_id,
            "privacy_unit": "patient",
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "history": [list(entry) for entry in history],
            "rounds": rounds,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(state, file, indent=2)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of the history at delta: what ``RDPAccountant.get_epsilon`` gives, with per-step RDP cached."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf  # Opacus agrees, after warning that the smallest alpha was optimal.
    # Summed exactly as RDPAccountant.get_privacy_spent does, so the result is the same float.
    rdp = sum(np.asarray(_rdp_per_step(sigma, q)) * steps for sigma, q, steps in history)
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one sampled-Gaussian step at each default order; slow for small sigma, hence cached."""
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return tuple(float(value) for value in np.atleast_1d(rdp))


def _extend(
    history: list[tuple[float, float, int]], noise_multiplier: float, sample_rate: float, steps: int
) -> list[tuple[float, float, int]]:
    # Merge like RDPAccountant.step does: consecutive rounds with the same (sigma, q) become one entry.
    sigma, q = float(noise_multiplier), float(sample_rate)
    if history and history[-1][:2] == (sigma, q):
        return [*history[:-1], (sigma, q, history[-1][2] + int(steps))]
    return [*history, (sigma, q, int(steps))]


def _patient_groups(patient_batches: Sequence[Any], vectorize: bool, n_params: int) -> list[list[int]]:
    """Positions of the patients, grouped by batch structure and tensor shapes when vectorizing, else singly."""
    if not vectorize:
        return [[i] for i in range(len(patient_batches))]
    # A group holds one gradient per patient at once: keep that to about 2**26 floats (256 MB in float32).
    max_group = max(1, 2**26 // max(1, n_params))
    groups: dict[Any, list[int]] = {}
    for position, batch in enumerate(patient_batches):
        leaves, spec = tree_flatten(batch)
        if leaves and all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            key: Any = (str(spec), tuple((leaf.shape, leaf.dtype, leaf.device) for leaf in leaves))
        else:
            key = ("single", position)
        groups.setdefault(key, []).append(position)
    return [group[start : start + max_group] for group in groups.values() for start in range(0, len(group), max_group)]


def _patient_grads(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    named: dict[str, torch.nn.Parameter],
    batch: Any,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One patient's gradient (with a leading patient dimension of 1, as vectorized) and loss, by one backward."""
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return (
        [(torch.zeros_like(p) if g is None else g).unsqueeze(0) for p, g in zip(named.values(), grads, strict=True)],
        loss.detach().reshape(1),
    )


def _vectorized_grads(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    named: dict[str, torch.nn.Parameter],
    batches: list[Any],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-patient gradients (one leading patient dimension per parameter) and losses of same-shape batches."""
    wrapper = _PatientLoss(model, loss_fn)
    params = {f"model.{name}": p.detach() for name, p in named.items()}

    def patient_loss(params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return functional_call(wrapper, params, (batch,))

    leaves_per_patient = [tree_flatten(batch)[0] for batch in batches]
    spec = tree_flatten(batches[0])[1]
    stacked = tree_unflatten([torch.stack(leaves) for leaves in zip(*leaves_per_patient, strict=True)], spec)
    grads, losses = vmap(grad_and_value(patient_loss), in_dims=(None, 0), randomness="different")(params, stacked)
    return [grads[f"model.{name}"] for name in named], losses.detach()


class _PatientLoss(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap in the parameters it differentiates."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        """The patient's total loss."""
        return self.loss_fn(self.model, batch)


def _refuse_running_stats(model: torch.nn.Module) -> None:
    # Running statistics are updated from every window in forward(), outside the clipped, noised gradient.
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.training and module.track_running_stats:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) updates running statistics from patient data outside "
                "DP-SGD; use GroupNorm/LayerNorm, or track_running_stats=False"
            )


def _check_round_params(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    _check_sample_rate(sample_rate)
    _check_steps(steps)


def _check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"patient sample rate must be in (0, 1], got {sample_rate}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) and well below 1 / number of patients, got {delta}")


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
