-- Staging: diagnoses, by concept.
CREATE OR REPLACE TEMP VIEW stg_condition_occurrence AS
SELECT
    CAST(person_id AS BIGINT) AS person_id,
    CAST(condition_concept_id AS INTEGER) AS condition_concept_id,
    CAST(condition_start_date AS DATE) AS condition_start_date
FROM src_condition_occurrence;
