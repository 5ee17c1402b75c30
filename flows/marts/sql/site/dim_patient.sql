-- Mart: one row per patient of the site, known only by the site's pseudonym; cohort fields for grouping.
CREATE OR REPLACE TABLE dim_patient AS
SELECT
    person_id,
    sex,
    birth_year_band,
    age_years,
    age_band,
    has_type_1_diabetes,
    cgm_device,
    pump_device,
    observed_from,
    observed_to
FROM int_patient_cohort
ORDER BY person_id;

COMMENT ON TABLE dim_patient IS 'One row per patient of the site (key person_id). Pseudonymous: no name, MRN, date of birth or address exists past the harmonized layer. Stays at the site.';
COMMENT ON COLUMN dim_patient.person_id IS 'Pseudonymous person key: HMAC of the source identifier with the site secret (the harmonized person_id). Joins every other table of this mart.';
COMMENT ON COLUMN dim_patient.sex IS 'male, female or unknown (from the OMOP gender concept).';
COMMENT ON COLUMN dim_patient.birth_year_band IS 'Five-year band of the year of birth, e.g. 2010-2014; unknown when the year is missing.';
COMMENT ON COLUMN dim_patient.age_years IS 'Calendar year of the first day of device data minus year of birth (as the twin''s features compute it); null without an observation period.';
COMMENT ON COLUMN dim_patient.age_band IS 'Cohort by age_years: 0-12, 13-17, 18+ or unknown. The federation''s cohort dimension age_band.';
COMMENT ON COLUMN dim_patient.has_type_1_diabetes IS 'Whether a type 1 diabetes diagnosis is recorded (condition_occurrence).';
COMMENT ON COLUMN dim_patient.cgm_device IS 'Manufacturer and model of the CGM worn (latest by start); null if none recorded.';
COMMENT ON COLUMN dim_patient.pump_device IS 'Manufacturer and model of the insulin pump used (latest by start); null if none recorded.';
COMMENT ON COLUMN dim_patient.observed_from IS 'First day the site holds device data for the patient (observation_period), UTC date.';
COMMENT ON COLUMN dim_patient.observed_to IS 'Last day the site holds device data for the patient (observation_period), UTC date.';
