-- Staging: the CGM and pump each patient wore (the pseudonymous device key is left behind).
CREATE OR REPLACE TEMP VIEW stg_device_exposure AS
SELECT
    CAST(person_id AS BIGINT) AS person_id,
    CAST(device_concept_id AS INTEGER) AS device_concept_id,
    CAST(device_source_value AS VARCHAR) AS device_model,
    CAST(device_exposure_start_datetime AS TIMESTAMPTZ) AS started_at
FROM src_device_exposure;
