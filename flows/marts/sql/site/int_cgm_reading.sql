-- Intermediate: CGM readings only, each with its UTC day and the 5-minute bin that holds it (bins floored in
-- UTC and spanning [bin_start, bin_start + 5 min), as in the twin's grid, flows/features.py). Bins are computed
-- from the epoch (bin_index = microseconds since 1970 // bin width): time_bucket() and date parts of a
-- TIMESTAMPTZ go through the time-zone library, ten times slower per row.
CREATE OR REPLACE TEMP TABLE int_cgm_reading AS
SELECT
    person_id,
    measured_at,
    value AS glucose_mg_dl,
    CAST(make_timestamp(epoch_us(measured_at)) AS DATE) AS day,
    epoch_us(measured_at) // getvariable('bin_us') AS bin_index
FROM stg_measurement
WHERE concept_id = getvariable('cgm_concept_id');
