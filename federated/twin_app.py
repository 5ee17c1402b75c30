"""The Flower app that trains the glucose twin across hospitals with patient-level DP (Message API, Flower 1.42).

Each SuperNode is one hospital. It reads only its own site's training features
(`<data-dir>/sites/<site>/features`, written by the site flow), answers three kinds of message, and
never sends a patient row:

- query: its name, data contract versions and privacy ledger, and the sums and counts of its training windows
  (for the shared input normalization; these moments are aggregates, but they are not covered by the DP ledger:
  see docs/privacy.md);
- train: records the round in the site's privacy ledger first (refusing, with the reason, a round that would
  pass the site's budget), then runs patient-level DP-SGD (with FedProx's proximal pull when asked) and returns
  the noised model with its example count and the site's cumulative (epsilon, delta);
- evaluate: the global model's squared errors at 30 and 60 minutes and persistence's, and its 90% interval
  coverage after site-local conformal calibration, on the site's held-out test patients (sums and counts, so
  the server can pool them exactly).

Patients are split the same way everywhere (`models.twin.split_patients`): ~70% train, ~10% calibrate, ~20% test.

The ServerApp waits for `min-nodes` hospitals, gathers the moments, builds the normalizer, and runs the chosen
strategy (FedAvg weighted by examples, FedProx or FedAdam) with federated evaluation each round. After every
round it checkpoints the global model (`federated.registry.Checkpoints`); started again with `resume = true` on
the same configuration it continues from the last checkpoint. The finished model is registered as a new version
(`federated.registry.Registry`) with its rounds, sites, examples, epsilon spent per site, metrics and the sites'
data contract versions. Rounds go on while `quorum` hospitals remain connected; a site that refuses or fails
is left out of that round.

Site identity: a deployed SuperNode names its site and data folder in its node_config (`site`, `data-dir`), and
its own privacy budget (`epsilon-budget`, `delta`: the server cannot raise them);
a simulated one (which only has `partition-id`) is the partition-id-th entry of run config `sites` under run
config `data-dir`. Only a simulated site accepts `dp = false` (plain training, for the non-private baseline): a
deployed hospital always trains privately.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from federated.privacy import BudgetExceeded, DPConfig, PrivacyLedger, noise_for_budget, train_private_round
from federated.registry import Checkpoint, Checkpoints, RegisteredModel, Registry, training_fingerprint
from flows.features import MANIFEST_FILE, read_features
from models.twin import (
    Moments,
    Normalizer,
    PatientSplit,
    TwinSurrogate,
    Windows,
    apply,
    build_windows,
    calibrate,
    load_state_arrays,
    pinball_loss,
    predict,
    split_patients,
    state_arrays,
    window_moments,
    window_tensors,
)
from models.twin.conformal import LOWER, MEDIAN, UPPER

LOG = logging.getLogger("flwr").getChild("twinfed")  # shown where Flower shows its own logs
DEFAULT_SITES = ("aurelia", "northbridge", "lakeside")
BUDGET_EXCEEDED = 4001  # error code of a site refusing a round that would pass its privacy budget
NON_PRIVATE_REFUSED = 4002  # error code of a deployed site asked to train without DP
HORIZONS_MIN = (30, 60)
STRATEGIES = ("fedavg", "fedprox", "fedadam")
# The run configuration and its defaults; pyproject.toml's [tool.flwr.app.config] holds the same values (tested).
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 6,
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "server-lr": 0.01,
    "dp": True,
    "target-epsilon": 0.0,  # > 0: the noise multiplier that makes the whole training spend this (replaces the next)
    "noise-multiplier": 2.0,  # q = 0.5, 4 steps a round: epsilon 2.4 after one round, 4.8 after four, 6.0 after six
    "max-grad-norm": 1.0,
    "patient-sample-rate": 0.5,
    "steps-per-round": 4,
    "lr": 0.03,
    "epsilon-budget": 8.0,
    "delta": 1e-4,
    "seed": 0,  # the initial model's weights (DP noise and patient sampling come from the OS's CSPRNG)
    "min-nodes": 3,  # hospitals that must have joined before the federation starts
    "quorum": 2,  # hospitals that must stay connected for the next round to start
    "node-wait-seconds": 120.0,
    "round-timeout": 600.0,  # seconds a round waits for replies before going on without the missing sites
    "sites": ",".join(DEFAULT_SITES),
    "data-dir": "data",
    "federation-dir": "data/federation",
    "resume": True,
}
# The keys whose values define a training: a checkpoint resumes only a run with the same ones.
TRAINING_KEYS = (
    "num-server-rounds", "strategy", "proximal-mu", "server-lr", "dp", "target-epsilon", "noise-multiplier",
    "max-grad-norm", "patient-sample-rate", "steps-per-round", "lr", "epsilon-budget", "delta", "seed", "sites",
)  # fmt: skip

client = ClientApp()


# --------------------------------------------------------------------------------------------------- client side


@client.query()
def describe(message: Message, context: Context) -> Message:
    """The site's name, contract versions, ledger, and the sums and counts of its training windows."""
    config = _config(message)
    site, data_dir = _site(context, config)
    split = _split(site, str(data_dir), _stamp(site, data_dir))
    ledger = _ledger(site, data_dir, context, config).summary()
    about: dict[str, Any] = {"name": site, **_contract_versions(site, data_dir),
                             "epsilon-spent": float(ledger["epsilon_spent"]),
                             "epsilon-budget": float(ledger["epsilon_budget"]),
                             "delta": float(ledger["delta"])}  # fmt: skip
    content = RecordDict({
        "moments": ArrayRecord(window_moments(split.train).to_arrays()),
        "metrics": MetricRecord({"num-examples": len(split.train)}),
        "site": ConfigRecord(about),
    })  # fmt: skip
    return Message(content, reply_to=message)


@client.train()
def train(message: Message, context: Context) -> Message:
    """Record the round in the site's ledger, then one round of patient-level DP-SGD; reply with the noised model."""
    config = _config(message)
    site, data_dir = _site(context, config)
    torch.set_num_threads(1)
    split = _split(site, str(data_dir), _stamp(site, data_dir))
    model = _model(config, message.content.array_records["arrays"])
    private = bool(config["dp"])
    if not private and "site" in context.node_config:
        reason = f"{site} trains only with differential privacy; a non-private round was asked for and refused"
        return Message(error=Error(code=NON_PRIVATE_REFUSED, reason=reason), reply_to=message)
    ledger = _ledger(site, data_dir, context, config)
    dp = DPConfig(noise_multiplier=float(config["noise-multiplier"]) if private else 0.0,
                  max_grad_norm=float(config["max-grad-norm"]) if private else float("inf"),
                  patient_sample_rate=float(config["patient-sample-rate"]), delta=ledger.delta,
                  steps_per_round=int(config["steps-per-round"]))  # fmt: skip
    if private:
        round_id = f"{message.metadata.run_id}:{config.get('server-round', 0)}"
        try:
            ledger.record_round(round_id, noise_multiplier=dp.noise_multiplier, sample_rate=dp.patient_sample_rate,
                                steps=dp.steps_per_round)  # fmt: skip
        except BudgetExceeded as refusal:
            # An error reply: the strategy leaves this site out of the round and the federation goes on without it.
            return Message(error=Error(code=BUDGET_EXCEEDED, reason=str(refusal)), reply_to=message)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    # Sampling and noise from the OS's CSPRNG: noise anyone could regenerate (say from the run id) protects nobody.
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    steps = train_private_round(model, _patient_batches(split.train), loss_fn=_patient_loss, optimizer=optimizer,
                                config=dp, generator=generator,
                                proximal_mu=float(config.get("proximal-mu", 0.0)))  # fmt: skip
    summary = ledger.summary()
    metrics: dict[str, Any] = {
        "num-examples": len(split.train),
        "epsilon-spent": float(summary["epsilon_spent"]),
        "delta": dp.delta,
        "private": int(private),
        "train-loss": sum(s.loss_sum for s in steps) / max(sum(s.n_patients for s in steps), 1),
    }
    content = RecordDict({"arrays": ArrayRecord(state_arrays(model)), "metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": site})})  # fmt: skip
    return Message(content, reply_to=message)


@client.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Squared errors at 30 and 60 min (model, persistence) and calibrated 90% coverage on the test patients."""
    config = _config(message)
    site, data_dir = _site(context, config)
    split = _split(site, str(data_dir), _stamp(site, data_dir))
    model = _model(config, message.content.array_records["arrays"])
    sums: dict[str, Any] = evaluation_sums(model, split.test, split.calibration)
    content = RecordDict({"metrics": MetricRecord(sums),
                          "site": ConfigRecord({"name": site})})  # fmt: skip
    return Message(content, reply_to=message)


def evaluation_sums(model: TwinSurrogate, test: Windows, calibration: Windows) -> dict[str, float]:
    """Sums and counts the server pools exactly: squared errors by horizon (model, persistence) and 90% coverage.

    Coverage is after conformal calibration on the site's calibration patients (all horizons together), against
    the CGM the site has; `raw-covered-90` is before calibration.
    """
    pred = predict(model, test)
    calibrated = apply(pred, calibrate(predict(model, calibration), calibration.target, alpha=0.1))
    observed = ~np.isnan(test.target)
    sums: dict[str, float] = {"num-examples": float(len(test))}
    for minutes in HORIZONS_MIN:
        k = minutes // 5 - 1
        seen = observed[:, k]
        truth = test.target[seen, k]
        sums[f"n-{minutes}"] = float(seen.sum())
        sums[f"sse-{minutes}"] = float(np.sum((pred[seen, k, MEDIAN] - truth) ** 2))
        sums[f"persistence-sse-{minutes}"] = float(np.sum((test.last_cgm[seen] - truth) ** 2))
    target = np.where(observed, test.target, 0.0)
    for name, forecast in (("covered-90", calibrated), ("raw-covered-90", pred)):
        inside = (forecast[..., LOWER] <= target) & (target <= forecast[..., UPPER]) & observed
        sums[name] = float(inside.sum())
    sums["n-90"] = float(observed.sum())
    return sums


def _site(context: Context, config: Mapping[str, Any]) -> tuple[str, Path]:
    node = context.node_config
    if "site" in node:
        return str(node["site"]), Path(str(node.get("data-dir", config["data-dir"])))
    sites = [s.strip() for s in str(config["sites"]).split(",") if s.strip()]
    partition = int(node["partition-id"])
    if partition >= len(sites):
        raise ValueError(f"simulated node {partition} has no site: run config `sites` lists only {sites}")
    return sites[partition], Path(str(config["data-dir"]))


def _features_dir(site: str, data_dir: Path) -> Path:
    return data_dir / "sites" / site / "features"


def _stamp(site: str, data_dir: Path) -> int:
    """Changes when the site flow rewrites the features (their manifest is written last), so the cache renews."""
    manifest = _features_dir(site, data_dir) / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"{site}: no training features at {manifest.parent}; run the site flow first")
    return manifest.stat().st_mtime_ns


@cache
def _split(site: str, data_dir: str, stamp: int) -> PatientSplit:
    """The site's windows split by patient (train, calibration, test); cached per features version."""
    return split_patients(build_windows(read_features(_features_dir(site, Path(data_dir)))))


def _ledger(site: str, data_dir: Path, context: Context, config: Mapping[str, Any]) -> PrivacyLedger:
    """The site's ledger, with the budget and delta the hospital set.

    A deployed hospital sets them in its node config (`epsilon-budget`, `delta`); the server's run config only
    supplies them in simulation, so no server can raise a hospital's budget.
    """
    node = context.node_config
    budget = float(node.get("epsilon-budget", config["epsilon-budget"]))
    delta = float(node.get("delta", config["delta"]))
    return PrivacyLedger(data_dir / "sites" / site / "privacy_ledger.json", site_id=site, epsilon_budget=budget,
                         delta=delta)  # fmt: skip


def _contract_versions(site: str, data_dir: Path) -> dict[str, str]:
    """The schema, contract and features versions the site's training data was validated and built with."""
    manifest = orjson.loads((_features_dir(site, data_dir) / MANIFEST_FILE).read_bytes())
    versions = {"features-version": str(manifest.get("features_version", "")),
                "schema-version": str(manifest.get("schema_version", ""))}  # fmt: skip
    state = data_dir / "sites" / site / "state.json"
    if state.is_file():
        versions["contract-version"] = str(orjson.loads(state.read_bytes()).get("versions", {}).get("contract", ""))
    return versions


def _config(message: Message) -> dict[str, Any]:
    content = message.content
    return DEFAULTS | dict(content.config_records["config"]) if "config" in content.config_records else dict(DEFAULTS)


def _model(config: Mapping[str, Any], arrays: ArrayRecord) -> TwinSurrogate:
    model = TwinSurrogate(Normalizer.from_dict(json.loads(str(config["normalizer"]))))
    load_state_arrays(model, arrays.to_numpy_ndarrays())
    return model


def _patient_batches(windows: Windows) -> list[tuple[torch.Tensor, ...]]:
    tensors = window_tensors(windows)
    return [tuple(t[torch.from_numpy(np.flatnonzero(windows.person_id == person))] for t in tensors)
            for person in np.unique(windows.person_id)]  # fmt: skip


def _patient_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    history, future_inputs, static, target = batch
    return pinball_loss(model(history, future_inputs, static), target, ~torch.isnan(target)).sum()


# --------------------------------------------------------------------------------------------------- server side


def server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is DEFAULTS, then the run's config, then `overrides` (for in-process runs)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federate(grid, DEFAULTS | dict(context.run_config) | dict(overrides or {}), run_id=context.run_id)

    return app


server = server_app()


def planned_noise(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with `noise-multiplier` derived from `target-epsilon` (when it is > 0 and training is private).

    The smallest noise whose num-server-rounds x steps-per-round steps at patient-sample-rate spend at most
    target-epsilon at the run's delta (Opacus' RDP accountant, as every site's ledger counts). A site whose own
    budget or delta is tighter still refuses the rounds that would pass its budget.
    """
    out = dict(config)
    target = float(config.get("target-epsilon", 0.0))
    if target > 0 and config["dp"]:
        steps = int(config["num-server-rounds"]) * int(config["steps-per-round"])
        rate = float(config["patient-sample-rate"])
        out["noise-multiplier"] = noise_for_budget(epsilon=target, delta=float(config["delta"]), sample_rate=rate,
                                                   steps=steps)  # fmt: skip
        LOG.info("noise multiplier %.3f: %d steps at q = %g spend epsilon %g at delta %g", out["noise-multiplier"],
                 steps, config["patient-sample-rate"], target, config["delta"])  # fmt: skip
    return out


def federate(grid: Grid, config: Mapping[str, Any], *, run_id: int = 0) -> RegisteredModel:
    """Train (or resume training) the twin over the connected hospitals and register it; return the registration."""
    if config["strategy"] not in STRATEGIES:
        raise ValueError(f"run config strategy = {config['strategy']!r}; choose one of {', '.join(STRATEGIES)}")
    config = planned_noise(config)
    federation_dir = Path(str(config["federation-dir"]))
    checkpoints, fingerprint = Checkpoints(federation_dir), training_fingerprint(config, TRAINING_KEYS)
    total_rounds = int(config["num-server-rounds"])
    shared = {k: v for k, v in config.items() if k in TRAINING_KEYS or k in ("sites", "data-dir")}
    if config["strategy"] != "fedprox":
        shared["proximal-mu"] = 0.0  # only FedProx pulls the sites' steps toward the global model

    nodes = _wait_for_nodes(grid, int(config["min-nodes"]), float(config["node-wait-seconds"]))
    sites = _describe_sites(grid, nodes, shared, timeout=float(config["round-timeout"]))
    resumed = checkpoints.latest() if config["resume"] else None
    if resumed is not None and resumed.fingerprint != fingerprint:
        LOG.warning("checkpoint of round %d is of another configuration; starting afresh", resumed.completed_rounds)
        resumed = None
    if resumed is not None:
        normalizer = Normalizer.from_dict(resumed.normalizer)
        model = TwinSurrogate(normalizer)
        load_state_arrays(model, resumed.arrays)
        LOG.info("resuming after round %d of %d from %s", resumed.completed_rounds, total_rounds, checkpoints.folder)
    else:
        checkpoints.clear()
        normalizer = Normalizer.fit_from_moments(_summed_moments(sites))
        torch.manual_seed(int(config["seed"]))
        model = TwinSurrogate(normalizer)
    done = resumed.completed_rounds if resumed else 0
    history = list(resumed.history) if resumed else []
    run_ids = [*(resumed.run_ids if resumed else []), run_id]
    strategy = _Tracked(_strategy(config), offset=done, history=history, names=_node_names(sites))
    if resumed is not None:
        strategy.restore(resumed.strategy_state, resumed.arrays)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            load_state_arrays(model, arrays.to_numpy_ndarrays())
            checkpoints.save(Checkpoint(fingerprint, done + server_round, state_arrays(model), normalizer.to_dict(),
                                        history, strategy.state(), run_ids))  # fmt: skip
        return None

    shared["normalizer"] = json.dumps(normalizer.to_dict())
    if total_rounds > done:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(state_arrays(model)), num_rounds=total_rounds - done,
                       timeout=float(config["round-timeout"]), train_config=ConfigRecord(shared),
                       evaluate_config=ConfigRecord(shared), evaluate_fn=checkpoint)  # fmt: skip
    if not any(entry["trained"] for entry in history):
        raise RuntimeError(f"no hospital trained in any of the {total_rounds} rounds; nothing registered: "
                           f"{_refusals(history)}")  # fmt: skip
    registered = Registry(federation_dir).register(model, _metadata(config, history, sites, run_ids, done))
    checkpoints.clear()
    LOG.info("registered %s in %s", registered.version, registered.path)
    return registered


def _strategy(config: Mapping[str, Any]) -> FedAvg:
    quorum = int(config["quorum"])
    common: dict[str, Any] = {"min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": quorum}
    if config["strategy"] == "fedprox":
        return FedProx(proximal_mu=float(config["proximal-mu"]), **common)
    if config["strategy"] == "fedadam":
        return FedAdam(eta=float(config["server-lr"]), eta_l=float(config["lr"]), **common)
    return FedAvg(**common)


class _Tracked(Strategy):
    """Runs another strategy with round numbers shifted after a resume, recording each site's part in each round.

    The history it keeps (one entry per round: which sites trained, refused or failed, their examples and epsilon,
    and the pooled and per-site evaluation) is what the checkpoints and the registry store.
    """

    def __init__(self, inner: FedAvg, *, offset: int, history: list[dict[str, Any]], names: dict[int, str]) -> None:
        self.inner, self.offset, self.history, self.names = inner, offset, history, names
        self._sent: list[Message] = []  # this round's messages: a reply names its node through them

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Any:
        """The wrapped strategy's training messages, for the absolute round number."""
        self._sent = list(self.inner.configure_train(server_round + self.offset, arrays, config, grid))
        return self._sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        """Record who trained, refused or failed; then aggregate as the wrapped strategy does."""
        replies = list(replies)
        sites: dict[str, dict[str, Any]] = {}
        for reply in replies:
            name = self._name(reply)
            if reply.has_error():
                status = "refused" if reply.error.code in (BUDGET_EXCEEDED, NON_PRIVATE_REFUSED) else "failed"
                sites[name] = {"status": status, "reason": str(reply.error.reason)}
                LOG.warning("round %d: %s %s: %s", server_round + self.offset, name, status, reply.error.reason)
            else:
                metrics: dict[str, Any] = dict(reply.content.metric_records["metrics"])
                sites[name] = {"status": "trained", "examples": int(metrics["num-examples"]),
                               "epsilon_spent": float(metrics["epsilon-spent"]), "private": bool(metrics["private"]),
                               "train_loss": float(metrics["train-loss"])}  # fmt: skip
        trained = sum(s["status"] == "trained" for s in sites.values())
        self.history.append({"round": server_round + self.offset, "trained": trained, "sites": sites})
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Any:
        """The wrapped strategy's evaluation messages, for the absolute round number."""
        self._sent = list(self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid))
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        """Pool the sites' error sums into RMSE and coverage (per site and overall) for this round's record."""
        replies = [r for r in replies if not r.has_error()]
        per_site = {self._name(r): dict(r.content.metric_records["metrics"]) for r in replies}
        evaluation: dict[str, Any] = {"sites": {name: pooled_metrics([sums]) for name, sums in per_site.items()},
                      "pooled": pooled_metrics(list(per_site.values()))}  # fmt: skip
        if self.history and self.history[-1]["round"] == server_round + self.offset:
            self.history[-1]["evaluation"] = evaluation
        LOG.info("round %d evaluation: %s", server_round + self.offset, evaluation["pooled"])
        return MetricRecord({k: v for k, v in evaluation["pooled"].items() if v is not None}) if replies else None

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """The server optimizer's state to checkpoint (FedAdam's first and second moments; none for FedAvg)."""
        slots = {slot: getattr(self.inner, slot, None) for slot in ("m_t", "v_t")}
        return {slot: dict(value) for slot, value in slots.items() if value}

    def restore(self, state: Mapping[str, Mapping[str, np.ndarray]], arrays: list[np.ndarray]) -> None:
        """Put a checkpoint's server optimizer state back."""
        for slot, value in state.items():
            setattr(self.inner, slot, dict(value))

    def _name(self, reply: Message) -> str:
        if not reply.has_error() and "site" in reply.content.config_records:
            return str(reply.content.config_records["site"]["name"])
        # The SuperLink answers for a node that died ("Node Unavailable") from its own id, not the node's: name the
        # node the message was sent to (the grid gives each sent message its id).
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        return self.names.get(node, f"node-{node}")


def pooled_metrics(sums: list[Mapping[str, Any]]) -> dict[str, float | None]:
    """RMSE by horizon (model and persistence), their ratio and 90% coverage from evaluation sums of any sites."""
    total = {key: sum(float(s.get(key, 0.0)) for s in sums) for key in (sums[0] if sums else {})}
    out: dict[str, float | None] = {"examples": total.get("num-examples", 0.0)}
    for minutes in HORIZONS_MIN:
        n = total.get(f"n-{minutes}", 0.0)
        rmse = float(np.sqrt(total[f"sse-{minutes}"] / n)) if n else None
        persistence = float(np.sqrt(total[f"persistence-sse-{minutes}"] / n)) if n else None
        out[f"rmse-{minutes}"], out[f"persistence-rmse-{minutes}"] = rmse, persistence
        out[f"rmse-ratio-{minutes}"] = rmse / persistence if rmse is not None and persistence else None
    n90 = total.get("n-90", 0.0)
    out["coverage-90"] = total["covered-90"] / n90 if n90 else None
    out["raw-coverage-90"] = total["raw-covered-90"] / n90 if n90 else None
    return out


def _wait_for_nodes(grid: Grid, count: int, seconds: float) -> list[int]:
    """The connected SuperNodes, once at least `count` have joined (or fail, naming how many did)."""
    deadline = time.monotonic() + seconds
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of the {count} hospitals needed joined within {seconds:g} s")
        time.sleep(1.0)
    return nodes


def _describe_sites(grid: Grid, nodes: list[int], config: Mapping[str, Any], timeout: float) -> dict[int, Message]:
    """Each answering node's description (name, versions, ledger, moments); fail if none answers."""
    queries = [Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=node, message_type="query")
               for node in nodes]  # fmt: skip
    answered = list(grid.send_and_receive(queries, timeout=timeout))
    replies = {r.metadata.src_node_id: r for r in answered if not r.has_error()}
    for failed in (r for r in answered if r.has_error()):
        LOG.warning("node %s did not describe its site: %s", failed.metadata.src_node_id, failed.error.reason)
    if not replies:
        reasons = "; ".join(sorted({str(r.error.reason) for r in answered}))
        raise RuntimeError(f"no site answered the normalization query ({len(answered)} replies): {reasons}")
    return replies


def _node_names(sites: Mapping[int, Message]) -> dict[int, str]:
    return {node: str(reply.content.config_records["site"]["name"]) for node, reply in sites.items()}


def _summed_moments(sites: Mapping[int, Message]) -> Moments:
    parts = [Moments.from_arrays(r.content.array_records["moments"].to_numpy_ndarrays()) for r in sites.values()]
    return sum(parts[1:], parts[0])


def _refusals(history: list[dict[str, Any]]) -> str:
    reasons = {f"{name}: {s['reason']}" for entry in history for name, s in entry["sites"].items() if "reason" in s}
    return "; ".join(sorted(reasons)) or "no site replied"


def _metadata(
    config: Mapping[str, Any], history: list[dict[str, Any]], sites: Mapping[int, Message], run_ids: list[int],
    resumed_after: int,
) -> dict[str, Any]:  # fmt: skip
    """What a registered model records about its training."""
    described = {str(r.content.config_records["site"]["name"]): dict(r.content.config_records["site"])
                 for r in sites.values()}  # fmt: skip
    per_site: dict[str, dict[str, Any]] = {}
    for name in sorted(set(described) | {n for entry in history for n in entry["sites"]}):
        parts = [entry["sites"][name] for entry in history if name in entry["sites"]]
        trained = [p for p in parts if p["status"] == "trained"]
        about = described.get(name, {})
        per_site[name] = {
            "examples": trained[-1]["examples"] if trained else 0,
            "rounds_trained": len(trained),
            "rounds_refused": sum(p["status"] == "refused" for p in parts),
            "rounds_failed": sum(p["status"] == "failed" for p in parts),
            "rounds_absent": len(history) - len(parts),
            "epsilon_spent": trained[-1]["epsilon_spent"] if trained else about.get("epsilon-spent"),
            "epsilon_budget": float(about.get("epsilon-budget", config["epsilon-budget"])),
            "delta": float(about.get("delta", config["delta"])),
            "contracts": {k: v for k, v in about.items() if k.endswith("-version")},
        }
    last_evaluated = next((e["evaluation"] for e in reversed(history) if "evaluation" in e), None)
    return {
        "rounds": len(history),
        "strategy": config["strategy"],
        "private": bool(config["dp"]),
        "privacy_unit": "patient",
        "sites": per_site,
        "examples": sum(s["examples"] for s in per_site.values()),
        "metrics": last_evaluated["pooled"] if last_evaluated else {},
        "metrics_by_site": last_evaluated["sites"] if last_evaluated else {},
        "history": history,
        "config": {k: config[k] for k in TRAINING_KEYS if k in config},
        "run_ids": run_ids,
        "resumed_after_round": resumed_after or None,
    }
