-- Intermediate: one row per patient with the cohort fields the marts group by (sex, age band, birth-year band),
-- the observation span, the type 1 diagnosis and the devices worn. Age is the calendar year the site's data start
-- minus the year of birth, as in the twin's features (flows/features.py: age_years).
CREATE OR REPLACE TEMP TABLE int_patient_cohort AS
WITH periods AS (
    SELECT person_id, min(period_start) AS observed_from, max(period_end) AS observed_to
    FROM stg_observation_period
    GROUP BY person_id
),
diagnosed AS (
    SELECT DISTINCT person_id
    FROM stg_condition_occurrence
    WHERE condition_concept_id = getvariable('type_1_diabetes_concept_id')
),
devices AS (
    SELECT
        person_id,
        arg_max(device_model, coalesce(started_at, TIMESTAMPTZ '1970-01-01 00:00:00+00'))
            FILTER (WHERE device_concept_id = getvariable('cgm_device_concept_id')) AS cgm_device,
        arg_max(device_model, coalesce(started_at, TIMESTAMPTZ '1970-01-01 00:00:00+00'))
            FILTER (WHERE device_concept_id = getvariable('pump_device_concept_id')) AS pump_device
    FROM stg_device_exposure
    GROUP BY person_id
),
aged AS (
    SELECT
        person.person_id,
        person.gender_concept_id,
        person.year_of_birth,
        year(periods.observed_from) - person.year_of_birth AS age_years,
        periods.observed_from,
        periods.observed_to,
        diagnosed.person_id IS NOT NULL AS has_type_1_diabetes,
        devices.cgm_device,
        devices.pump_device
    FROM stg_person AS person
    LEFT JOIN periods USING (person_id)
    LEFT JOIN diagnosed USING (person_id)
    LEFT JOIN devices USING (person_id)
)
SELECT
    person_id,
    CASE gender_concept_id
        WHEN getvariable('male_concept_id') THEN 'male'
        WHEN getvariable('female_concept_id') THEN 'female'
        ELSE 'unknown'
    END AS sex,
    CASE
        WHEN year_of_birth IS NULL THEN 'unknown'
        ELSE format('{}-{}', year_of_birth // 5 * 5, year_of_birth // 5 * 5 + 4)
    END AS birth_year_band,
    age_years,
    CASE
        WHEN age_years IS NULL THEN 'unknown'
        WHEN age_years < 13 THEN '0-12'
        WHEN age_years < 18 THEN '13-17'
        ELSE '18+'
    END AS age_band,
    observed_from,
    observed_to,
    has_type_1_diabetes,
    cgm_device,
    pump_device
FROM aged;
