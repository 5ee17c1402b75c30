"""Where the marts live, what they are built from, and the small-cell threshold: one place for each.

    data/sites/<site>/predictions/<batch_id>/   a prediction batch: forecast.parquet, whatif.parquet, batch.json
    data/sites/<site>/privacy_ledger.json       the site's privacy ledger (federated/privacy.py)
    data/sites/<site>/mart/site.duckdb          the site mart (patient rows; never leaves the site)
    data/sites/<site>/mart/share/               what leaves the site: suppressed aggregates (*.parquet, manifest.json)
    <federation-dir>/mart/federation.duckdb     the federation mart (aggregates only)

Only the share folder and the federation mart ever leave a site's disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.site_store import SiteStore

# A cell describing fewer patients than this is suppressed before it leaves a site (k, as many public-health
# releases use; OHDSI Achilles defaults to 5).
MIN_CELL_PATIENTS = 11

SITE_MART_FILE = "site.duckdb"
FEDERATION_MART_FILE = "federation.duckdb"
SHARE_MANIFEST = "manifest.json"
SHARE_FORMAT = 1
PRIVACY_LEDGER_FILE = "privacy_ledger.json"
BATCH_FILE, FORECAST_FILE, WHATIF_FILE = "batch.json", "forecast.parquet", "whatif.parquet"
FEDERATION = "federation"  # the target name `twinfed marts query` takes for the federation mart


@dataclass(frozen=True)
class SiteMartLayout:
    """Paths a site mart reads and writes, under one site's store."""

    store: SiteStore

    @classmethod
    def under(cls, data_dir: Path, site_id: str) -> SiteMartLayout:
        """The standard layout: data/sites/<site>."""
        return cls(SiteStore.under(data_dir, site_id))

    @property
    def site_id(self) -> str:
        """The site's id (its folder name)."""
        return self.store.root.name

    @property
    def predictions(self) -> Path:
        """Folder of prediction batches, one sub-folder per batch."""
        return self.store.root / "predictions"

    @property
    def privacy_ledger(self) -> Path:
        """The site's privacy ledger."""
        return self.store.root / PRIVACY_LEDGER_FILE

    @property
    def mart_dir(self) -> Path:
        """Folder of the site mart and its share."""
        return self.store.root / "mart"

    @property
    def database(self) -> Path:
        """The live site mart."""
        return self.mart_dir / SITE_MART_FILE

    @property
    def share(self) -> Path:
        """The suppressed aggregates the site exports to the federation."""
        return self.mart_dir / "share"


def federation_mart_path(federation_dir: Path) -> Path:
    """The live federation mart."""
    return Path(federation_dir) / "mart" / FEDERATION_MART_FILE


def site_ids(data_dir: Path) -> list[str]:
    """Sites with a store under data_dir/sites (a folder holding harmonized tables), sorted."""
    sites = Path(data_dir) / "sites"
    if not sites.is_dir():
        return []
    return sorted(p.name for p in sites.iterdir() if (p / "harmonized").is_dir())
