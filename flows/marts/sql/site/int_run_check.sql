-- Intermediate: one row per run and check, from the run records' check results (DQD-style categories).
CREATE OR REPLACE TEMP TABLE int_run_check AS
SELECT
    run.run_id,
    run.site_id,
    run.run_started_at,
    check_result.name AS check_name,
    check_result."table" AS table_name,
    check_result.category,
    check_result.status,
    check_result."rows" AS rows_checked,
    check_result.violating AS violating_rows,
    check_result.violating_pct,
    check_result.threshold_pct,
    check_result.description
FROM (SELECT *, unnest(checks) AS check_result FROM stg_run) AS run;
