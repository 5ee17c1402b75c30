-- Staging: the harmonized person table, renamed and cast. Source values (the site pseudonym string, sex as the
-- source wrote it) are left behind: the mart needs neither.
CREATE OR REPLACE TEMP VIEW stg_person AS
SELECT
    CAST(person_id AS BIGINT) AS person_id,
    CAST(gender_concept_id AS INTEGER) AS gender_concept_id,
    CAST(year_of_birth AS INTEGER) AS year_of_birth
FROM src_person;
