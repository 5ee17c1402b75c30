"""A tiny generated site through record ingestion and features, for tests that need real windows and truth."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from data_contracts.schema import IMAGE_FEATURE
from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.features import build_features
from flows.ingest.mapping import mapping_for
from flows.ingest.pseudonym import load_or_create_secret
from flows.ingest.records import ingest_records


def ingested_features(folder: Path, site: str, *, patients: int, days: int) -> dict[str, pl.DataFrame]:
    """Generate `site` into `folder`, ingest its records (no images) and return its feature tables.

    The site's secret is fixed and kept where the site flow keeps it, so every run splits the same patients and
    `federated.evaluation.load_truth` can link windows back to the simulator's truth.
    """
    profile = next(p for p in load_profiles() if p.site.id == site).with_overrides(patients=patients, days=days)
    generate_sites([profile], folder, workers=1)
    (folder / "sites" / site).mkdir(parents=True)
    (folder / "sites" / site / "secret.key").write_text(bytes(range(32)).hex())
    secret = load_or_create_secret(folder / "sites" / site / "secret.key")
    batch = ingest_records(SitePaths.under(folder, site).drop, mapping_for(site), secret=secret,
                           workdir=folder / "work", build_docs=False)  # fmt: skip
    return build_features(batch.tables | {"image_feature": IMAGE_FEATURE.empty()})
