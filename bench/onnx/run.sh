#!/usr/bin/env bash
# Cross-runtime inference benchmark: burn (flex) vs tract vs ONNX Runtime on the same weights.
# Usage (from the repository root): bench/onnx/run.sh [ROUNDS] [ITERS]
# Needs: python3 -m pip install -r bench/onnx/requirements.txt
# Writes target/onnx-bench/ (exports, .onnx files, results.jsonl) and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
iters=${2:-2000}
warmup=$((iters / 10))
out=target/onnx-bench
mkdir -p "$out"
cargo build --release --manifest-path bench/inference/Cargo.toml --target-dir target
bin=target/release/ember-inference-bench
$bin export --out "$out/export"
# Builds the ONNX graphs and checks ORT against burn's golden outputs (fails above 1e-4).
python3 bench/onnx/build_onnx.py "$out/export" "$out/onnx" | tee "$out/agreement.jsonl"
: > "$out/results.jsonl"
for r in $(seq 1 "$rounds"); do
  # Also checks tract (and burn per backend) against burn flex before timing.
  $bin latency --onnx "$out/onnx" --iters "$iters" --warmup "$warmup" --round "$r" | tee -a "$out/results.jsonl"
  python3 bench/onnx/bench_ort.py "$out/export" "$out/onnx" "$iters" "$warmup" "$r" | tee -a "$out/results.jsonl"
done
: > "$out/memory.jsonl"
for b in models/bundles/*.bundle; do $bin memory --bundle "$b" | tee -a "$out/memory.jsonl"; done
python3 bench/onnx/report.py "$out"
