-- Mart: CGM consensus metrics (Battelino et al., Diabetes Care 2019) per patient and UTC day, over the day's
-- readings. SD is the population SD, as models/glucose_metrics.py computes it.
CREATE OR REPLACE TABLE mart_patient_daily AS
SELECT
    person_id,
    day,
    count(*) AS readings,
    100.0 * count(DISTINCT bin_index) / (24 * 60 // getvariable('bin_minutes')) AS coverage_pct,
    avg(glucose_mg_dl) AS mean_mg_dl,
    stddev_pop(glucose_mg_dl) AS sd_mg_dl,
    100.0 * stddev_pop(glucose_mg_dl) / avg(glucose_mg_dl) AS cv_pct,
    getvariable('gmi_intercept') + getvariable('gmi_slope') * avg(glucose_mg_dl) AS gmi_pct,
    100.0 * avg(CAST(glucose_mg_dl BETWEEN getvariable('range_low') AND getvariable('range_high') AS INTEGER))
        AS tir_70_180_pct,
    100.0 * avg(CAST(glucose_mg_dl < getvariable('range_low') AS INTEGER)) AS tbr_below_70_pct,
    100.0 * avg(CAST(glucose_mg_dl < getvariable('range_low_severe') AS INTEGER)) AS tbr_below_54_pct,
    100.0 * avg(CAST(glucose_mg_dl > getvariable('range_high') AS INTEGER)) AS tar_above_180_pct,
    100.0 * avg(CAST(glucose_mg_dl > getvariable('range_high_severe') AS INTEGER)) AS tar_above_250_pct
FROM int_cgm_reading
GROUP BY person_id, day
ORDER BY person_id, day;

COMMENT ON TABLE mart_patient_daily IS 'CGM consensus metrics per patient and UTC day (key person_id, day), from the harmonized CGM readings. Targets (consensus): TIR > 70%, below 70 < 4%, below 54 < 1%, above 180 < 25%, above 250 < 5%, CV <= 36%, at least 70% coverage.';
COMMENT ON COLUMN mart_patient_daily.person_id IS 'Pseudonymous patient (dim_patient.person_id).';
COMMENT ON COLUMN mart_patient_daily.day IS 'UTC calendar day of the readings.';
COMMENT ON COLUMN mart_patient_daily.readings IS 'CGM readings that day.';
COMMENT ON COLUMN mart_patient_daily.coverage_pct IS 'Share of the day''s 288 five-minute bins holding at least one reading, % (the features'' cgm_coverage, per day).';
COMMENT ON COLUMN mart_patient_daily.mean_mg_dl IS 'Mean glucose of the day''s readings, mg/dL.';
COMMENT ON COLUMN mart_patient_daily.sd_mg_dl IS 'Standard deviation (population) of the day''s readings, mg/dL.';
COMMENT ON COLUMN mart_patient_daily.cv_pct IS 'Coefficient of variation, 100 x SD / mean, % (target <= 36%).';
COMMENT ON COLUMN mart_patient_daily.gmi_pct IS 'Glucose management indicator, 3.31 + 0.02392 x mean mg/dL, %. Meaningful over 14 days, shown per day for trends.';
COMMENT ON COLUMN mart_patient_daily.tir_70_180_pct IS 'Time in range: share of readings from 70 to 180 mg/dL inclusive, %.';
COMMENT ON COLUMN mart_patient_daily.tbr_below_70_pct IS 'Time below range: share of readings under 70 mg/dL, % (includes those under 54).';
COMMENT ON COLUMN mart_patient_daily.tbr_below_54_pct IS 'Time below 54 mg/dL (level 2 hypoglycaemia), %.';
COMMENT ON COLUMN mart_patient_daily.tar_above_180_pct IS 'Time above range: share of readings over 180 mg/dL, % (includes those over 250).';
COMMENT ON COLUMN mart_patient_daily.tar_above_250_pct IS 'Time above 250 mg/dL (level 2 hyperglycaemia), %.';
