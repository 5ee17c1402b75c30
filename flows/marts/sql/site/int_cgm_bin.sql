-- Intermediate: CGM per patient and 5-minute bin, the mean of the bin's readings (what a forecast is scored on).
CREATE OR REPLACE TEMP TABLE int_cgm_bin AS
SELECT
    person_id,
    bin_index,
    avg(glucose_mg_dl) AS glucose_mg_dl,
    count(*) AS readings
FROM int_cgm_reading
GROUP BY person_id, bin_index;
