-- Staging: measurements in canonical units (CGM readings, labs, vitals), renamed and cast.
CREATE OR REPLACE TEMP VIEW stg_measurement AS
SELECT
    CAST(person_id AS BIGINT) AS person_id,
    CAST(measurement_concept_id AS INTEGER) AS concept_id,
    CAST(measurement_datetime AS TIMESTAMPTZ) AS measured_at,
    CAST(value_as_number AS DOUBLE) AS value
FROM src_measurement;
