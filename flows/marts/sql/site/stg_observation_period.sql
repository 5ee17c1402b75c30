-- Staging: the spans during which the site holds each patient's device data.
CREATE OR REPLACE TEMP VIEW stg_observation_period AS
SELECT
    CAST(person_id AS BIGINT) AS person_id,
    CAST(observation_period_start_date AS DATE) AS period_start,
    CAST(observation_period_end_date AS DATE) AS period_end
FROM src_observation_period;
