-- No federation table has a person-level column.
SELECT table_name, column_name
FROM duckdb_columns()
WHERE database_name = current_database()
    AND schema_name = 'main'
    AND (column_name ILIKE '%person%' OR column_name ILIKE '%patient_id%' OR column_name ILIKE '%birth%'
         OR column_name IN ('input_cutoff', 'target_time', 'measured_at', 'day'))
