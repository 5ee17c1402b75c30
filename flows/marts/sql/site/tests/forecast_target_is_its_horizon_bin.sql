-- A forecast at horizon h (5, 10, ..., 120 min) targets the CGM bin starting h - 5 minutes after its input cut-off
-- (the twin's windows, models/twin/windows.py); anything else would be scored against the wrong bin.
SELECT batch_id, person_id, input_cutoff, horizon_min, target_time
FROM fct_glucose_forecast
WHERE horizon_min NOT BETWEEN getvariable('bin_minutes') AND 120
    OR horizon_min % getvariable('bin_minutes') <> 0
    OR epoch_us(target_time) <> epoch_us(input_cutoff) + CAST(horizon_min - getvariable('bin_minutes') AS BIGINT) * 60000000
