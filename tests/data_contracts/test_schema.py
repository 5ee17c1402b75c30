"""The canonical schema and vocabulary: consistent, loadable in DuckDB, and strict about columns."""

from __future__ import annotations

import duckdb
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_contracts import vocabulary as v
from data_contracts.schema import MEASUREMENT, TABLES


def test_every_table_loads_in_duckdb_with_its_key() -> None:
    """Each table's DDL creates a DuckDB table whose columns match the schema and whose key is unique."""
    con = duckdb.connect()
    for table in TABLES.values():
        con.execute(table.duckdb_ddl())
        columns = [row[0] for row in con.execute(f"DESCRIBE {table.name}").fetchall()]
        assert columns == table.column_names
        assert table.key.endswith("_id") and table.columns[0].required
    con.execute("INSERT INTO person VALUES (1, 8507, 2010, 'p1', 'M')")
    with pytest.raises(duckdb.ConstraintException):
        con.execute("INSERT INTO person VALUES (1, 8532, 2011, 'p2', 'F')")


def test_conform_orders_casts_and_names_missing_columns() -> None:
    """conform() returns the schema's columns in order and names any column that is missing."""
    frame = pl.DataFrame({name: [None] for name in reversed(MEASUREMENT.column_names)})
    conformed = MEASUREMENT.conform(frame)
    assert conformed.columns == MEASUREMENT.column_names
    assert conformed.schema == MEASUREMENT.polars_schema
    with pytest.raises(ValueError, match="value_as_number"):
        MEASUREMENT.conform(frame.drop("value_as_number"))


def test_vocabulary_is_consistent() -> None:
    """Concept ids are unique, every canonical unit has a unit concept, and local ids sit in OMOP's local range."""
    ids = [m.concept_id for m in v.MEASUREMENTS.values()] + [c for c, _ in v.IMAGE_FEATURES.values()]
    ids += [
        v.TYPE_1_DIABETES,
        v.INSULIN_ASPART,
        v.CGM_DEVICE,
        v.INSULIN_PUMP,
        v.CARBOHYDRATE_INTAKE,
        v.BOLUS_CARB_INPUT,
    ]
    assert len(ids) == len(set(ids))
    for measurement in v.MEASUREMENTS.values():
        assert measurement.unit in v.UNIT_CONCEPTS
        assert measurement.plausible_low < measurement.plausible_high
    assert v.MEASUREMENTS["cgm_glucose"].concept_id >= v.LOCAL_CONCEPT_BASE
    assert v.MEASUREMENTS["plasma_glucose"].concept_id == 3004501


@given(st.floats(1.0, 40.0))
def test_glucose_unit_round_trip(mmol: float) -> None:
    """mmol/L converts to mg/dL by 18.016 and back without loss."""
    mg = v.to_canonical(mmol, "mmol/L", "mg/dL")
    assert mg == pytest.approx(mmol * 18.016)
    assert mg / v.MG_DL_PER_MMOL_L == pytest.approx(mmol)


def test_hba1c_ifcc_to_ngsp_and_unknown_conversion() -> None:
    """IFCC 53 mmol/mol is NGSP 7.0%; a conversion nobody defined fails naming both units."""
    assert v.to_canonical(53.0, "mmol/mol", "%") == pytest.approx(7.0, abs=0.05)
    with pytest.raises(ValueError, match="'furlong'.*'kg'"):
        v.to_canonical(1.0, "furlong", "kg")
