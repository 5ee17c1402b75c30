"""DuckDB marts: one per site (patient-level, stays at the site) and one for the federation (aggregates only).

`site.py` builds a site's mart from its harmonized tables, run records, privacy ledger and published prediction
batches, and exports the site's already-suppressed aggregates (`share_*`); `federation.py` builds the federation's
mart from those exports and the model registry. Both publish atomically (`runner.publish_database`); `query.py`
opens them read-only for analysts and `cli.py` is the `twinfed marts` command line. See docs/marts.md.
"""
