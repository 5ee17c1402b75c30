"""Round checkpoints and the model registry: atomic, versioned, never overwritten, refusing foreign models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from federated.registry import CHECKPOINTS_KEPT, Checkpoint, Checkpoints, Registry, training_fingerprint
from models.twin import (
    FUTURE_CHANNELS,
    HISTORY_CHANNELS,
    HISTORY_STEPS,
    HORIZON_STEPS,
    STATIC_CHANNELS,
    Moments,
    Normalizer,
    TwinSurrogate,
    state_arrays,
)
from models.twin.windows import NORMALIZED


def twin(seed: int, hidden: int | None = None) -> TwinSurrogate:
    """A small untrained twin with a made-up normalizer (the default architecture unless `hidden` is given)."""
    torch.manual_seed(seed)
    n = len(NORMALIZED)
    moments = Moments(count=np.full(n, 10.0), total=np.arange(n) * 10.0, total_sq=np.arange(n) ** 2 * 10.0 + 40.0)
    normalizer = Normalizer.fit_from_moments(moments)
    return TwinSurrogate(normalizer) if hidden is None else TwinSurrogate(normalizer, hidden=hidden)


def checkpoint(rounds: int, fingerprint: str = "abc") -> Checkpoint:
    """A checkpoint after `rounds` rounds with recognisable arrays and a FedAdam-like state."""
    arrays = [np.full((2, 3), float(rounds)), np.arange(4.0)]
    state = {"m_t": {"0": np.ones(3) * rounds}, "v_t": {"0": np.zeros(3)}}
    return Checkpoint(fingerprint, rounds, arrays, {"mean": [1.0]}, [{"round": r} for r in range(1, rounds + 1)],
                      state, [7])  # fmt: skip


def test_checkpoints_round_trip_and_keep_the_last_two(tmp_path: Path) -> None:
    """The newest checkpoint comes back exactly (model and strategy arrays, history); older ones are pruned."""
    store = Checkpoints(tmp_path)
    assert store.latest() is None
    for rounds in (1, 2, 3):
        store.save(checkpoint(rounds))
    latest = store.latest()
    assert latest is not None and latest.completed_rounds == 3 and latest.fingerprint == "abc"
    for got, want in zip(latest.arrays, checkpoint(3).arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(latest.strategy_state["m_t"]["0"], np.full(3, 3.0))
    assert latest.history == [{"round": 1}, {"round": 2}, {"round": 3}] and latest.run_ids == [7]
    assert sorted(p.name for p in store.folder.iterdir()) == ["round-0002", "round-0003"][-CHECKPOINTS_KEPT:]
    store.clear()
    assert store.latest() is None


def test_a_half_written_checkpoint_is_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing round 2 leaves round 1 as the latest checkpoint, and no stray folder behind."""
    store = Checkpoints(tmp_path)
    store.save(checkpoint(1))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(checkpoint(2))
    latest = store.latest()
    assert latest is not None and latest.completed_rounds == 1
    assert [p.name for p in store.folder.iterdir()] == ["round-0001"]


def test_fingerprint_ignores_paths_and_sees_training_settings() -> None:
    """Same training settings, other folders -> same fingerprint; another noise multiplier -> another."""
    keys = ("noise-multiplier", "num-server-rounds")
    base = {"noise-multiplier": 1.5, "num-server-rounds": 3, "data-dir": "/a"}
    assert training_fingerprint(base, keys) == training_fingerprint(base | {"data-dir": "/b"}, keys)
    assert training_fingerprint(base, keys) != training_fingerprint(base | {"noise-multiplier": 1.0}, keys)


def test_registry_versions_models_with_metadata(tmp_path: Path) -> None:
    """Each registration is a new version; a model comes back predicting exactly as it was registered."""
    registry = Registry(tmp_path)
    assert registry.latest() is None and registry.versions() == []
    first, second = twin(0), twin(1)
    v1 = registry.register(first, {"rounds": 2, "sites": {"a": {"epsilon_spent": 3.0}}})
    v2 = registry.register(second, {"rounds": 3, "sites": {}})
    assert (v1.version, v2.version) == ("twin-0001", "twin-0002") and registry.versions() == [v1.version, v2.version]
    latest = registry.latest()
    assert latest is not None and latest.version == "twin-0002" and latest.metadata["rounds"] == 3
    stored = registry.get("twin-0001")
    assert stored.metadata["sites"]["a"]["epsilon_spent"] == 3.0
    assert stored.metadata["model"]["parameters"] == sum(p.numel() for p in first.parameters())
    loaded = stored.model()
    for got, want in zip(state_arrays(loaded), state_arrays(first), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.normalizer().mean, first.normalizer().mean)
    with pytest.raises(KeyError, match="twin-0001, twin-0002"):
        registry.get("twin-0009")


def test_registry_refuses_a_model_of_another_architecture(tmp_path: Path) -> None:
    """A model registered with other layer shapes fails with a message, not a silent wrong load."""
    registered = Registry(tmp_path).register(twin(0, hidden=16), {"rounds": 1})  # not the default width
    with pytest.raises(ValueError, match="another TwinSurrogate architecture"):
        registered.model()


def test_registry_never_overwrites_a_version(tmp_path: Path) -> None:
    """A version folder that appears meanwhile (another registration) makes this one take the next number."""
    registry = Registry(tmp_path)
    registry.register(twin(0), {"rounds": 1})
    taken = registry.folder / "twin-0002"
    taken.mkdir()
    (taken / "metadata.json").write_text(json.dumps({"version": "twin-0002"}))
    (taken / "model.npz").write_bytes(b"someone else's")
    third = registry.register(twin(1), {"rounds": 1})
    assert third.version == "twin-0003" and (taken / "model.npz").read_bytes() == b"someone else's"


def test_registered_model_predicts_like_the_original(tmp_path: Path) -> None:
    """Normalizer and weights both travel: the same forecast from the registered copy."""
    model = TwinSurrogate(twin(0).normalizer())
    loaded = Registry(tmp_path).register(model, {"rounds": 1}).model()
    generator = torch.Generator().manual_seed(0)
    history = torch.rand(8, HISTORY_STEPS, len(HISTORY_CHANNELS), generator=generator) * 100
    plan = torch.rand(8, HORIZON_STEPS, len(FUTURE_CHANNELS), generator=generator)
    static = torch.rand(8, len(STATIC_CHANNELS), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(history, plan, static), model(history, plan, static), rtol=0, atol=0)
