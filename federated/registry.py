"""Round checkpoints of a federated training in progress, and the registry of finished twin models.

Both live in the federation folder (run config `federation-dir`), on the server side only:

    <federation-dir>/checkpoints/round-0003/{arrays.npz, state.json}   the last two completed rounds
    <federation-dir>/registry/twin-0001/{model.npz, metadata.json}     one folder per registered version

A checkpoint holds what a restarted ServerApp needs to continue where training stopped: the global model after
the round, the normalizer, the server optimizer's state (FedAdam's moments), the per-round history, and a
fingerprint of the training configuration (a checkpoint of another configuration is never resumed). A registered
model holds the global model and its metadata: rounds, sites, examples, epsilon spent per site, metrics and the
data contract versions of the sites that trained it.

Every folder is written beside its final place and renamed into it, so a reader (or a crash) never sees half a
checkpoint or half a model; `np.load` never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.twin import Normalizer, TwinSurrogate, load_state_arrays, state_arrays

REGISTRY_FORMAT = 1
CHECKPOINTS_KEPT = 2
_VERSION = re.compile(r"^twin-(\d{4,})$")
_ROUND = re.compile(r"^round-(\d{4,})$")


@dataclass(frozen=True)
class Checkpoint:
    """The state of a federated training after `completed_rounds` rounds."""

    fingerprint: str  # of the training configuration (see `training_fingerprint`)
    completed_rounds: int
    arrays: list[np.ndarray]  # the global model's state arrays, in `state_arrays` order
    normalizer: dict[str, Any]
    history: list[dict[str, Any]]  # one entry per completed round
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # e.g. FedAdam's m_t, v_t
    run_ids: list[int] = field(default_factory=list)  # the Flower runs that trained it so far


def training_fingerprint(config: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """A short hash of the configuration values that define a training (paths and resume flags left out)."""
    chosen = {key: config[key] for key in sorted(keys) if key in config}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpoints:
    """The round checkpoints under `<federation_dir>/checkpoints`; the newest complete one wins."""

    def __init__(self, federation_dir: Path | str) -> None:
        self.folder = Path(federation_dir) / "checkpoints"

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write the checkpoint atomically and keep only the last few."""
        arrays = {f"model/{i:04d}": a for i, a in enumerate(checkpoint.arrays)}
        for slot, named in checkpoint.strategy_state.items():
            arrays.update({f"strategy/{slot}/{name}": a for name, a in named.items()})
        state = {
            "format": REGISTRY_FORMAT,
            "fingerprint": checkpoint.fingerprint,
            "completed_rounds": checkpoint.completed_rounds,
            "normalizer": checkpoint.normalizer,
            "history": checkpoint.history,
            "run_ids": checkpoint.run_ids,
            "saved_at": _now(),
        }
        target = self.folder / f"round-{checkpoint.completed_rounds:04d}"

        def write(folder: Path) -> None:
            np.savez(folder / "arrays.npz", allow_pickle=False, **arrays)
            (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")

        _publish_folder(target, write, replace=True)
        for old in self._rounds()[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(self.folder / f"round-{old:04d}", ignore_errors=True)
        return target

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint, or None when there is none."""
        rounds = self._rounds()
        if not rounds:
            return None
        folder = self.folder / f"round-{rounds[-1]:04d}"
        state = json.loads((folder / "state.json").read_text())
        if state.get("format") != REGISTRY_FORMAT:
            raise ValueError(f"{folder}: checkpoint format {state.get('format')!r}, expected {REGISTRY_FORMAT}")
        with np.load(folder / "arrays.npz", allow_pickle=False) as stored:
            named = {name: stored[name] for name in stored.files}
        model = [named[name] for name in sorted(n for n in named if n.startswith("model/"))]
        strategy: dict[str, dict[str, np.ndarray]] = {}
        for name, array in named.items():
            if name.startswith("strategy/"):
                _, slot, key = name.split("/", 2)
                strategy.setdefault(slot, {})[key] = array
        return Checkpoint(
            fingerprint=state["fingerprint"],
            completed_rounds=int(state["completed_rounds"]),
            arrays=model,
            normalizer=state["normalizer"],
            history=state["history"],
            strategy_state=strategy,
            run_ids=[int(r) for r in state.get("run_ids", [])],
        )

    def clear(self) -> None:
        """Remove every checkpoint (once the model they led to is registered)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = (_ROUND.match(p.name) for p in self.folder.iterdir() if (p / "state.json").is_file())
        return sorted(int(m.group(1)) for m in found if m)


@dataclass(frozen=True)
class RegisteredModel:
    """One registered twin version: its folder and metadata."""

    version: str
    path: Path
    metadata: dict[str, Any]

    def arrays(self) -> list[np.ndarray]:
        """The model's state arrays, in `state_arrays` order."""
        with np.load(self.path / "model.npz", allow_pickle=False) as stored:
            return [stored[name] for name in sorted(stored.files)]

    def model(self) -> TwinSurrogate:
        """The twin, ready to predict; refuses a model whose architecture this code does not have."""
        model = TwinSurrogate(Normalizer.from_dict(self.metadata["normalizer"]))
        expected = [list(a.shape) for a in state_arrays(model)]
        stored = self.metadata["model"]["state_shapes"]
        if stored != expected:
            raise ValueError(
                f"{self.path}: registered with another TwinSurrogate architecture (parameter shapes {stored}, this "
                f"code's {expected}); load it with the twinfed version that trained it"
            )
        load_state_arrays(model, self.arrays())
        return model


class Registry:
    """Versioned twin models under `<federation_dir>/registry`: twin-0001, twin-0002, ..."""

    def __init__(self, federation_dir: Path | str) -> None:
        self.folder = Path(federation_dir) / "registry"

    def versions(self) -> list[str]:
        """Registered versions, oldest first."""
        if not self.folder.is_dir():
            return []
        found = (_VERSION.match(p.name) for p in self.folder.iterdir() if (p / "metadata.json").is_file())
        return [m.group(0) for m in sorted((m for m in found if m), key=lambda m: int(m.group(1)))]

    def get(self, version: str) -> RegisteredModel:
        """The registered model `version` (KeyError naming the known versions if absent)."""
        path = self.folder / version
        if not _VERSION.match(version) or not (path / "metadata.json").is_file():
            raise KeyError(f"no model {version!r} in {self.folder}; registered: {', '.join(self.versions()) or 'none'}")
        return RegisteredModel(version, path, json.loads((path / "metadata.json").read_text()))

    def latest(self) -> RegisteredModel | None:
        """The newest registered model, or None."""
        versions = self.versions()
        return self.get(versions[-1]) if versions else None

    def register(self, model: TwinSurrogate, metadata: Mapping[str, Any]) -> RegisteredModel:
        """Store the model under the next version number with its metadata (model and normalizer added)."""
        arrays = state_arrays(model)
        record = {
            "format": REGISTRY_FORMAT,
            **metadata,
            "registered_at": _now(),
            "model": {
                "class": type(model).__name__,
                "parameters": int(sum(p.numel() for p in model.parameters())),
                "state_shapes": [list(a.shape) for a in arrays],
            },
            "normalizer": model.normalizer().to_dict(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:  # another registration may take a number at the same time: the rename then fails, try the next
            versions = self.versions()
            number = int(versions[-1].split("-")[1]) + 1 if versions else 1
            version = f"twin-{number:04d}"
            record["version"] = version

            def write(folder: Path) -> None:
                np.savez(folder / "model.npz", allow_pickle=False, **{f"{i:04d}": a for i, a in enumerate(arrays)})
                record["sha256"] = hashlib.sha256((folder / "model.npz").read_bytes()).hexdigest()
                (folder / "metadata.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")

            try:
                path = _publish_folder(self.folder / version, write, replace=False)
            except FileExistsError:
                continue
            return RegisteredModel(version, path, json.loads((path / "metadata.json").read_text()))


def _publish_folder(target: Path, write: Any, *, replace: bool) -> Path:
    """Fill a fresh folder beside `target` with `write(folder)`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(staging, target)  # fails if target exists and is not empty: never overwrite a version
        except OSError as exc:
            if target.exists():
                raise FileExistsError(f"{target} exists") from exc
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
