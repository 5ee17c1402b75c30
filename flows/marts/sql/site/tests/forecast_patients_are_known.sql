-- Every forecast and what-if row is about a patient of dim_patient (a relationship test).
SELECT person_id FROM fct_glucose_forecast ANTI JOIN dim_patient USING (person_id)
UNION ALL
SELECT person_id FROM fct_whatif ANTI JOIN dim_patient USING (person_id)
