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
# Captured windows (capture streams' results carry their raw window) and the labels given to
# them: the latest labelling of each capture is its label.
try:
    out["captures"] = [
        {"device": r[0], "stream": r[1], "seq": r[2], "trigger": r[3], "values": r[4], "source_seq": r[5]}
        for r in con.execute(
            f"""
            SELECT device, stream, seq, capture_trigger, len(capture_window), source_seq
            FROM read_parquet('{root}/kind=inference/*/*/*.parquet', hive_partitioning = true)
            WHERE capture_window IS NOT NULL ORDER BY device, stream, seq
            """
        ).fetchall()
    ]
except duckdb.IOException:
    out["captures"] = []
try:
    out["label_events"] = con.execute(
        f"SELECT count(*) FROM read_parquet('{root}/kind=label/*/*/*.parquet', hive_partitioning = true)"
    ).fetchone()[0]
    out["labels"] = [
        {"device": r[0], "stream": r[1], "seq": r[2], "label": r[3]}
        for r in con.execute(
            f"""
            SELECT device, stream, seq, arg_max(label, id)
            FROM read_parquet('{root}/kind=label/*/*/*.parquet', hive_partitioning = true)
            GROUP BY device, stream, seq ORDER BY device, stream, seq
            """
        ).fetchall()
    ]
except duckdb.IOException:
    out["label_events"] = 0
    out["labels"] = []
out["schema_versions"] = sorted(set(out["schema_versions"]))
print(json.dumps(out, default=str))
