"""Reads the fleet's data lake with DuckDB, without Ember, as a data team would.

Usage: lake_query.py <lake root>. Prints one JSON object: per kind, per (device, stream), the
record count, distinct sequence numbers, their sum, min and max (and for telemetry the sum of
every value); the schema versions found in the files' metadata; and rows whose hive `date`
partition disagrees with their `ts`.
"""

import json
import sys

import duckdb

root = sys.argv[1]
con = duckdb.connect()
out = {"schema_versions": [], "misplaced": 0}
for kind in ("telemetry", "inference"):
    glob = f"{root}/kind={kind}/*/*/*.parquet"
    extra = ", sum(list_sum(\"values\")) AS value_sum" if kind == "telemetry" else ""
    try:
        rows = con.execute(
            f"""
            SELECT device, stream, count(*) AS n, count(DISTINCT seq) AS distinct_seq,
                   sum(seq) AS sum_seq, min(seq) AS min_seq, max(seq) AS max_seq {extra}
            FROM read_parquet('{glob}', hive_partitioning = true)
            GROUP BY device, stream ORDER BY device, stream
            """
        ).fetchall()
        cols = [d[0] for d in con.description]
        out[kind] = [dict(zip(cols, [float(v) if isinstance(v, float) else v for v in r])) for r in rows]
        out["misplaced"] += con.execute(
            f"""
            SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true)
            WHERE CAST(date AS VARCHAR) <> strftime(ts AT TIME ZONE 'UTC', '%Y-%m-%d')
            """
        ).fetchone()[0]
        out["schema_versions"] += [
            r[0].decode() if isinstance(r[0], bytes) else r[0]
            for r in con.execute(
                f"SELECT DISTINCT value FROM parquet_kv_metadata('{glob}') "
                "WHERE key = 'ember.lake.schema_version'"
            ).fetchall()
        ]
    except duckdb.IOException:
        out[kind] = []
out["schema_versions"] = sorted(set(out["schema_versions"]))
print(json.dumps(out, default=str))
