"""The marts flow: rebuild and publish site marts (with their shares), then the federation mart.

A site runs it for itself after its prediction flow (`sites=[site], federation=False`); the federation runs it for
the federation mart alone (`sites=[], federation=True`); the demo runs everything (`sites=None`). One site's failure
keeps that site's previous mart live and does not stop the others; the flow fails at the end if any build did.
Results are not persisted and the artifact holds counts only, never a patient row.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.marts.federation import FederationMartSummary, build_federation_mart
from flows.marts.layout import site_ids
from flows.marts.runner import MartBuildError
from flows.marts.site import SiteMartSummary, build_site_mart

DEFAULT_DATA_DIR = Path("data")


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, persist_result=False)
def publish_site_mart(data_dir: Path, site_id: str) -> SiteMartSummary:
    """Build, check and publish one site's mart and share."""
    return build_site_mart(data_dir, site_id)


# A site rebuilding its share while the federation reads it makes the read fail its manifest check: retry.
@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, persist_result=False)
def publish_federation_mart(data_dir: Path, federation_dir: Path) -> FederationMartSummary:
    """Build, check and publish the federation mart from the sites' shares and the registry."""
    return build_federation_mart(data_dir, federation_dir)


@flow(name="publish-marts")
def publish_marts(
    sites: list[str] | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
    federation_dir: Path = DEFAULT_DATA_DIR / "federation",
    federation: bool = True,
) -> dict[str, str]:
    """Publish the chosen sites' marts (default: every site), then the federation mart; return each mart's file."""
    logger = get_run_logger()
    chosen = site_ids(data_dir) if sites is None else sites
    published: dict[str, str] = {}
    rows: list[dict[str, object]] = []
    failed: list[str] = []
    for site_id in chosen:
        try:
            summary = publish_site_mart(data_dir, site_id)
        except MartBuildError as error:
            logger.error("site mart %s not published, the previous one stays live: %s", site_id, error)
            failed.append(site_id)
            continue
        published[site_id] = str(summary.database)
        counts = {"forecasts": summary.rows["fct_glucose_forecast"], "patients": summary.rows["dim_patient"]}
        rows.append({"mart": site_id, "seconds": round(summary.seconds, 1), "bytes": summary.bytes, **counts})
    if federation:
        try:
            fed = publish_federation_mart(data_dir, federation_dir)
            published["federation"] = str(fed.database)
            rows.append({"mart": "federation", "seconds": round(fed.seconds, 1), "bytes": fed.bytes,
                         "forecasts": None, "patients": None})  # fmt: skip
        except MartBuildError as error:
            logger.error("federation mart not published, the previous one stays live: %s", error)
            failed.append("federation")
    create_table_artifact(key="marts-published", table=rows, description="Marts published by this run (counts only)")
    if failed:
        raise MartBuildError(
            f"marts not published: {', '.join(failed)} (see the log; their previous versions stay live)"
        )
    return published


if __name__ == "__main__":
    publish_marts()
