"""The Flower app that trains the glucose twin across hospitals with patient-level DP (Message API, Flower 1.42).

Each SuperNode is one hospital. It reads only its own site's training features
(`<data-dir>/sites/<site>/features`, written by the site flow), answers three kinds of message, and
never sends a patient row:

- query: the sums and counts of its training windows (for the shared input normalization; these
  moments are aggregates, but they are not yet covered by the DP ledger: see docs/privacy.md);
- train: records the round in the site's privacy ledger first (refusing, with the reason, a round
  that would pass the site's budget), then runs patient-level DP-SGD and returns the noised model
  with its example count and the site's cumulative (epsilon, delta);
- evaluate: the global model's RMSE at 30 and 60 minutes and persistence's on the site's held-out
  patients (a fixed, keyed split by pseudonymous person id).

The ServerApp gathers the moments, builds the normalizer, and runs FedAvg weighted by examples. Site
identity and data folder come from the SuperNode's `node_config` (`site`, `data-dir`); in a simulation
without them, node `partition-id` i is the i-th site of TWINFED_SITES (default: the three demo sites)
under TWINFED_DATA_DIR (default `data`).

This module is the first part of the federation (issue 5); checkpoints, the registry, FedProx/FedAdam
and the TLS deployment are not built yet.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from federated.privacy import BudgetExceeded, DPConfig, PrivacyLedger, train_private_round
from flows.features import read_features
from models.twin import (
    Moments,
    Normalizer,
    TwinSurrogate,
    Windows,
    build_windows,
    load_state_arrays,
    pinball_loss,
    predict,
    state_arrays,
    window_moments,
    window_tensors,
)

DEFAULT_SITES = ("aurelia", "northbridge", "lakeside")
BUDGET_EXCEEDED = 4001  # error code of a site refusing a round that would pass its privacy budget
HELD_OUT_EVERY = 5  # every fifth patient (in pseudonymous id order, at least one) is held out for evaluation
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 2,
    "noise-multiplier": 1.5,  # with q = 0.5 and 4 steps a round: epsilon 3.6 after one round, 5.0 after two
    "max-grad-norm": 5.0,
    "patient-sample-rate": 0.5,
    "steps-per-round": 4,
    "lr": 0.003,
    "epsilon-budget": 8.0,
    "delta": 1e-4,
    "min-nodes": 3,  # hospitals that must have joined before the federation starts
    "node-wait-seconds": 120.0,
}

client = ClientApp()
server = ServerApp()


def _site(context: Context) -> tuple[str, Path]:
    node = context.node_config
    if "site" in node:
        return str(node["site"]), Path(str(node.get("data-dir", "data")))
    sites = os.environ.get("TWINFED_SITES", ",".join(DEFAULT_SITES)).split(",")
    return sites[int(node["partition-id"])], Path(os.environ.get("TWINFED_DATA_DIR", "data"))


@cache
def _windows(site: str, data_dir: str) -> tuple[Windows, Windows]:
    """The site's training and held-out windows (split by person, so no patient is in both)."""
    windows = build_windows(read_features(Path(data_dir) / "sites" / site / "features"))
    held_out = np.isin(windows.person_id, np.unique(windows.person_id)[::HELD_OUT_EVERY])
    return windows.select(np.flatnonzero(~held_out)), windows.select(np.flatnonzero(held_out))


def _config(message: Message) -> dict[str, Any]:
    return DEFAULTS | dict(message.content.config_records["config"]) if "config" in message.content else dict(DEFAULTS)


@client.query()
def moments(message: Message, context: Context) -> Message:
    """The sums and counts of the site's training windows."""
    site, data_dir = _site(context)
    train, _ = _windows(site, str(data_dir))
    record = ArrayRecord(window_moments(train).to_arrays())
    return Message(
        RecordDict({"moments": record, "metrics": MetricRecord({"num-examples": len(train)})}), reply_to=message
    )


@client.train()
def train(message: Message, context: Context) -> Message:
    """Record the round in the site's ledger, then one round of patient-level DP-SGD; reply with the noised model."""
    site, data_dir = _site(context)
    config = _config(message)
    torch.set_num_threads(1)
    train_windows, _ = _windows(site, str(data_dir))
    model = _model(config, message.content.array_records["arrays"])
    dp = DPConfig(noise_multiplier=float(config["noise-multiplier"]), max_grad_norm=float(config["max-grad-norm"]),
                  patient_sample_rate=float(config["patient-sample-rate"]), delta=float(config["delta"]),
                  steps_per_round=int(config["steps-per-round"]))  # fmt: skip
    ledger = PrivacyLedger(data_dir / "sites" / site / "privacy_ledger.json", site_id=site,
                           epsilon_budget=float(config["epsilon-budget"]), delta=dp.delta)  # fmt: skip
    round_id = f"{message.metadata.run_id}:{config.get('server-round', 0)}"
    try:
        ledger.record_round(round_id, noise_multiplier=dp.noise_multiplier, sample_rate=dp.patient_sample_rate,
                            steps=dp.steps_per_round)  # fmt: skip
    except BudgetExceeded as refusal:
        # An error reply: the strategy leaves this site out of the round and the federation goes on without it.
        return Message(error=Error(code=BUDGET_EXCEEDED, reason=str(refusal)), reply_to=message)
    patients = _patient_batches(train_windows)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    # Sampling and noise from the OS's CSPRNG: noise anyone could regenerate (say from the run id) protects nobody.
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    train_private_round(model, patients, loss_fn=_patient_loss, optimizer=optimizer, config=dp, generator=generator)
    summary = ledger.summary()
    metrics: dict[str, Any] = {"num-examples": len(train_windows), "epsilon-spent": float(summary["epsilon_spent"]),
               "delta": dp.delta, "refused": 0}  # fmt: skip
    content = RecordDict({"arrays": ArrayRecord(state_arrays(model)), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


@client.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """RMSE of the global model's median at 30 and 60 minutes, and persistence's, on the site's held-out patients."""
    site, data_dir = _site(context)
    _, held_out = _windows(site, str(data_dir))
    model = _model(_config(message), message.content.array_records["arrays"])
    median = predict(model, held_out)[:, :, 1]
    metrics: dict[str, Any] = {"num-examples": len(held_out)}
    for minutes in (30, 60):
        k = minutes // 5 - 1
        observed = ~np.isnan(held_out.target[:, k])
        truth = held_out.target[observed, k]
        metrics[f"rmse-{minutes}"] = float(np.sqrt(np.mean((median[observed, k] - truth) ** 2)))
        metrics[f"persistence-rmse-{minutes}"] = float(np.sqrt(np.mean((held_out.last_cgm[observed] - truth) ** 2)))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Gather the normalization moments, then FedAvg (weighted by examples) with federated evaluation each round."""
    config: dict[str, Any] = DEFAULTS | dict(context.run_config)
    nodes = _wait_for_nodes(grid, int(config["min-nodes"]), float(config["node-wait-seconds"]))
    queries = [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes]
    answered = list(grid.send_and_receive(queries))
    replies = [r for r in answered if not r.has_error()]
    if not replies:
        reasons = "; ".join(sorted({str(r.error.reason) for r in answered}))
        raise RuntimeError(f"no site answered the normalization query ({len(answered)} replies): {reasons}")
    total = sum((Moments.from_arrays(r.content.array_records["moments"].to_numpy_ndarrays()) for r in replies[1:]),
                Moments.from_arrays(replies[0].content.array_records["moments"].to_numpy_ndarrays()))  # fmt: skip
    normalizer = Normalizer.fit_from_moments(total)
    model = TwinSurrogate(normalizer)
    shared = {k: v for k, v in config.items() if k != "num-server-rounds"} | {
        "normalizer": json.dumps(normalizer.to_dict())
    }
    strategy = FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=len(nodes))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(state_arrays(model)),
                            num_rounds=int(config["num-server-rounds"]), train_config=ConfigRecord(shared),
                            evaluate_config=ConfigRecord(shared))  # fmt: skip
    out = Path(os.environ.get("TWINFED_MODEL_DIR", "data/federation"))
    out.mkdir(parents=True, exist_ok=True)
    arrays = result.arrays.to_numpy_ndarrays() if result.arrays is not None else []
    np.savez(out / "global_model.npz", *arrays)
    (out / "normalizer.json").write_text(json.dumps(normalizer.to_dict(), indent=2))


def _wait_for_nodes(grid: Grid, count: int, seconds: float) -> list[int]:
    """The connected SuperNodes, once at least `count` have joined (or fail, naming how many did)."""
    deadline = time.monotonic() + seconds
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of the {count} hospitals needed joined within {seconds:g} s")
        time.sleep(1.0)
    return nodes


def _model(config: dict[str, Any], arrays: ArrayRecord) -> TwinSurrogate:
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
