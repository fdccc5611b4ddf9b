"""Markdown tables from bench/onnx/run.sh's results (target/onnx-bench/*.jsonl).

For each case: the median over rounds of p50 and p99, the range of p50 over rounds, the
ratio of the median p50 to ONNX Runtime's (C API, one thread) median p50 (< 1: faster than
ORT), and per call the minor page faults and Rust heap allocations of the timed loop.
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RUNTIMES = ["burn-flex", "burn-wgpu", "ort-c-1thread", "tract"]
BASE = "ort-c-1thread"


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip().startswith("{")]


def main():
    out = Path(sys.argv[1])
    cases = defaultdict(list)
    for r in lines(out / "results.jsonl"):
        cases[(r["model"], r["batch"], r["runtime"])].append(r)
    models = sorted({m for m, _, _ in cases if not m.startswith("identity")})
    rounds = len({r["round"] for rs in cases.values() for r in rs})
    print(f"Latency, µs per call (median over {rounds} rounds; p50 range over rounds in brackets; "
          "ratio = p50 / ONNX Runtime C API 1-thread p50; faults and allocations per call)\n")
    print("| model | batch | runtime | p50 | p50 range | p99 | ratio vs ORT | minor faults / call | Rust allocations / call |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    for m in models:
        for b in (1, 32):
            base = cases.get((m, b, BASE))
            base_p50 = statistics.median(r["p50_us"] for r in base) if base else None
            for rt in RUNTIMES:
                rs = cases.get((m, b, rt))
                if not rs:
                    continue
                p50s = [r["p50_us"] for r in rs]
                p50 = statistics.median(p50s)
                p99 = statistics.median(r["p99_us"] for r in rs)
                ratio = f"{p50 / base_p50:.2f}" if base_p50 else "—"
                faults = statistics.median(r.get("minor_faults_per_call", float("nan")) for r in rs)
                allocs = statistics.median(r.get("rust_allocations_per_call", float("nan")) for r in rs)
                print(f"| {m} | {b} | {rt} | {p50:.1f} | {min(p50s):.1f}–{max(p50s):.1f} | {p99:.1f} | {ratio} "
                      f"| {faults:.2f} | {allocs:.1f} |")
    agreement = out / "agreement.jsonl"
    if agreement.exists():
        print("\nAgreement with burn on the golden vectors (max |difference|):\n")
        print("| model | ORT vs burn golden | tract vs burn flex | ONNX file bytes |")
        print("|---|---:|---:|---:|")
        tract = defaultdict(float)
        for (m, b, rt), rs in cases.items():
            if rt == "tract":
                tract[m] = max(tract[m], max(r["max_abs_diff_vs_burn"] for r in rs))
        for a in lines(agreement):
            print(f"| {a['model']} | {a['max_abs_diff_ort_vs_burn_golden']:.2e} | {tract.get(a['model'], float('nan')):.2e} | {a['onnx_bytes']:,} |")
    memory = out / "memory.jsonl"
    if memory.exists():
        print("\nMemory (burn flex, one process per bundle; RSS from /proc/self/statm):\n")
        print("| model | weights in bundle | params | f32 weights in memory | RSS Δ load | RSS Δ after batch 1 | after batch 32 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in lines(memory):
            print(f"| {r['model']} | {r['weights_file_bytes']:,} B | {r['params']:,} | {r['f32_bytes_in_memory']:,} B | "
                  f"{r['rss_delta_load_kib']:,} KiB | {r['rss_delta_after_batch1_kib']:,} KiB | {r['rss_delta_after_batch32_kib']:,} KiB |")


if __name__ == "__main__":
    main()
