"""The twinfed command line: help on every subcommand, and `simulate` writing consistent tables."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def subcommands() -> list[str]:
    return [command.name or command.callback.__name__ for command in app.registered_commands]  # type: ignore[union-attr]


def test_top_level_help_lists_every_subcommand() -> None:
    """`twinfed --help` exits 0 and names each subcommand."""
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in subcommands():
        assert name in result.output


@pytest.mark.parametrize("words", [["simulate"], ["population"], ["demo"], ["sites"], ["sites", "list"],
                                   ["sites", "generate"]])  # fmt: skip
def test_every_subcommand_has_help(words: list[str]) -> None:
    """Each subcommand answers --help with its own usage line."""
    result = runner.invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and words[-1] in result.output


def test_sites_generate_writes_one_drop_and_its_truth(tmp_path: Path) -> None:
    """`twinfed sites generate --site` writes that site's drop and ground truth, and no other site's."""
    args = ["sites", "generate", "--site", "northbridge", "--patients", "2", "--days", "1", "--data-dir", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "drops/northbridge/ehr/cgm_readings.csv").is_file()
    assert (tmp_path / "ground_truth/northbridge/fault_manifest.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "drops").iterdir()) == ["northbridge"]


def test_unknown_site_id_is_a_clear_error(tmp_path: Path) -> None:
    """`--site` with an id no profile has fails and names the id."""
    result = runner.invoke(app, ["sites", "generate", "--site", "atlantis", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0 and "atlantis" in result.output


def test_simulate_writes_consistent_tables(tmp_path: Path) -> None:
    """`twinfed simulate` writes one row per patient, per minute of BG and per CGM sample."""
    out = tmp_path / "sim"
    result = runner.invoke(
        app, ["simulate", "--patients", "4", "--days", "1", "--sensor", "GuardianRT", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    patients = pl.read_parquet(out / "patients.parquet")
    glucose = pl.read_parquet(out / "glucose.parquet")
    cgm = pl.read_parquet(out / "cgm.parquet")
    assert patients.height == 4 and patients["patient"].n_unique() == 4
    assert glucose.height == 4 * (1440 + 1)
    assert cgm.height == 4 * (1440 // 5 + 1)
    assert cgm["cgm_mg_dl"].min() >= 39.0 and cgm["cgm_mg_dl"].max() <= 600.0
    assert str(cgm.schema["time"]) == "Datetime(time_unit='ms', time_zone='UTC')"


def test_unknown_sensor_is_a_clear_error(tmp_path: Path) -> None:
    """An unknown --sensor fails with the list of sensors that exist."""
    result = runner.invoke(app, ["simulate", "--sensor", "Libre", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "Dexcom" in result.output
