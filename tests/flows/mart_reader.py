"""A mart reader in its own process, for the publishing tests: it imports duckdb only.

    python mart_reader.py hold PATH        open PATH read-only, print its signature, wait for a line on stdin,
                                           print the signature again from the same connection, exit
    python mart_reader.py poll PATH STOP   open, sign and close PATH in a loop until the file STOP exists;
                                           print every signature seen (one JSON line each)

A signature is the row count of every table plus the build time: two whole builds differ in it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import duckdb


def signature(con: duckdb.DuckDBPyConnection) -> dict[str, object]:
    """Row count of every table and the build time of the mart: what tells one whole build from another."""
    tables = [row[0] for row in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY table_name").fetchall()]
    counts: dict[str, object] = {}
    for table in tables:
        row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
        counts[table] = row[0] if row else None
    if "share_site" in tables:
        built = con.execute("SELECT CAST(built_at AS VARCHAR) FROM share_site").fetchone()
        counts["built_at"] = built[0] if built else None
    return counts


def main() -> None:
    """Run one of the two modes (see the module docstring)."""
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "hold":
        con = duckdb.connect(path, read_only=True)
        print(json.dumps(signature(con)), flush=True)
        sys.stdin.readline()
        print(json.dumps(signature(con)), flush=True)
        con.close()
        return
    stop = Path(sys.argv[3])
    while not stop.exists():
        try:
            con = duckdb.connect(path, read_only=True)
        except duckdb.Error as error:  # the test fails on this line: a reader must always find a whole mart
            print(json.dumps({"error": str(error)}), flush=True)
            continue
        print(json.dumps(signature(con)), flush=True)
        con.close()
        time.sleep(0.01)


if __name__ == "__main__":
    main()
