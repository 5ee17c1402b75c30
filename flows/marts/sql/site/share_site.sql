-- Share: one row describing the site for the federation: size (suppressed under k), data versions, latest run,
-- published predictions and privacy spend.
CREATE OR REPLACE TABLE share_site AS
WITH patients AS (
    SELECT count(*) AS n_patients FROM int_patient_cohort
),
latest_run AS (
    SELECT
        arg_max(run_id, run_id) AS latest_run_id,
        arg_max(schema_version, run_id) AS schema_version,
        arg_max(contract_version, run_id) AS contract_version,
        count(*) AS runs
    FROM stg_run
),
batches AS (
    SELECT count(*) FILTER (WHERE published) AS batches_published, max(issued_at) FILTER (WHERE published) AS latest_issued_at
    FROM dim_prediction_batch
),
privacy AS (
    SELECT
        arg_max(epsilon_after, ledger_position) AS epsilon_spent,
        arg_max(epsilon_budget, ledger_position) AS epsilon_budget,
        arg_max(delta, ledger_position) AS delta,
        count(*) AS privacy_rounds
    FROM mart_privacy_ledger
)
SELECT
    getvariable('site_id') AS site_id,
    CAST(getvariable('built_at') AS TIMESTAMPTZ) AS built_at,
    getvariable('min_cell_patients') AS min_cell_patients,
    patients.n_patients < getvariable('min_cell_patients') AS n_patients_suppressed,
    CASE WHEN patients.n_patients >= getvariable('min_cell_patients') THEN patients.n_patients END AS n_patients,
    latest_run.latest_run_id,
    latest_run.runs,
    latest_run.schema_version,
    latest_run.contract_version,
    batches.batches_published,
    batches.latest_issued_at,
    privacy.epsilon_spent,
    privacy.epsilon_budget,
    privacy.delta,
    privacy.privacy_rounds
FROM patients, latest_run, batches, privacy;

COMMENT ON TABLE share_site IS 'What the site shares about itself (one row, key site_id). Exported to mart/share/share_site.parquet.';
COMMENT ON COLUMN share_site.site_id IS 'The site.';
COMMENT ON COLUMN share_site.built_at IS 'When the site mart and this share were built, UTC.';
COMMENT ON COLUMN share_site.min_cell_patients IS 'k: the smallest number of patients a shared cell may describe.';
COMMENT ON COLUMN share_site.n_patients_suppressed IS 'True when the site has fewer than k patients and n_patients is withheld.';
COMMENT ON COLUMN share_site.n_patients IS 'Patients in the site''s harmonized person table; null when suppressed.';
COMMENT ON COLUMN share_site.latest_run_id IS 'Latest site-flow run recorded.';
COMMENT ON COLUMN share_site.runs IS 'Site-flow run records the mart read.';
COMMENT ON COLUMN share_site.schema_version IS 'Canonical schema version of the latest run.';
COMMENT ON COLUMN share_site.contract_version IS 'Data contract version of the latest run.';
COMMENT ON COLUMN share_site.batches_published IS 'Prediction batches published into the site mart.';
COMMENT ON COLUMN share_site.latest_issued_at IS 'Issue time of the latest published prediction batch, UTC.';
COMMENT ON COLUMN share_site.epsilon_spent IS 'Cumulative epsilon the site''s privacy ledger has spent (after its latest round); null without a ledger.';
COMMENT ON COLUMN share_site.epsilon_budget IS 'The site''s epsilon budget.';
COMMENT ON COLUMN share_site.delta IS 'Delta of the site''s (epsilon, delta) guarantee.';
COMMENT ON COLUMN share_site.privacy_rounds IS 'Federated rounds the site''s privacy ledger recorded.';
