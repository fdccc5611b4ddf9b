#!/usr/bin/env bash
# Cross-runtime inference benchmark: burn (flex) vs ONNX Runtime's C API vs tract on the same
# weights, all in one Rust process (ember-inference-bench).
# Usage (from the repository root): bench/onnx/run.sh [ROUNDS] [ITERS]
# Needs: python3 -m pip install -r bench/onnx/requirements.txt (numpy and onnx build the graphs;
# the onnxruntime wheel provides both the Python check in build_onnx.py and the
# libonnxruntime.so the benchmark loads through the `ort` crate's load-dynamic feature).
# Writes target/onnx-bench/ (exports, .onnx files, results.jsonl) and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
iters=${2:-2000}
warmup=$((iters / 10))
out=target/onnx-bench
mkdir -p "$out"
# Its own target dir: a different workspace and Cargo.lock from Ember's.
target=${EMBER_BENCH_TARGET_DIR:-target/inference-bench}
cargo build --release --manifest-path bench/inference/Cargo.toml --target-dir "$target"
bin=$target/release/ember-inference-bench
ort_lib=$(python3 -c 'import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[0])')
ort_version=$(python3 -c 'import onnxruntime; print(onnxruntime.__version__)')
echo "ONNX Runtime $ort_version: $ort_lib" | tee "$out/ort.txt"
$bin export --out "$out/export"
# Builds the ONNX graphs and checks ORT against burn's golden outputs (fails above 1e-4).
python3 bench/onnx/build_onnx.py "$out/export" "$out/onnx" | tee "$out/agreement.jsonl"
# Checks ORT and tract against burn before timing; rounds alternate the runtimes.
$bin latency --onnx "$out/onnx" --ort-lib "$ort_lib" --rounds "$rounds" --iters "$iters" \
  --warmup "$warmup" | tee "$out/results.jsonl"
: > "$out/memory.jsonl"
for b in models/bundles/*.bundle; do $bin memory --bundle "$b" | tee -a "$out/memory.jsonl"; done
python3 bench/onnx/report.py "$out"
