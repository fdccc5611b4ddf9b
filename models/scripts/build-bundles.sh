#!/usr/bin/env bash
# Retrains both models from their default seeds and rebuilds the four committed bundles in
# models/bundles/, signed with the DEVELOPMENT key (models/keys/dev/). Takes well under a
# minute after the build. Run from anywhere:
#
#   models/scripts/build-bundles.sh [VERSION]      # default version 1.0.0
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="${1:-1.0.0}"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
nice -n 10 cargo build --quiet -p ember-models --bin ember-models
bin="$CARGO_TARGET_DIR/debug/ember-models"
runs="$CARGO_TARGET_DIR/models-runs"

for model in activity anomaly; do
    /usr/bin/time -f "$model: trained in %e s wall, %U s user" "$bin" train "$model" --out "$runs/$model" --quiet
    for precision in f32 int8; do
        out="models/bundles/$model-$precision.bundle"
        "$bin" bundle --run "$runs/$model" --precision "$precision" --version "$version" --out "$out"
        "$bin" sign "$out" --key models/keys/dev/dev.key
        "$bin" verify "$out" --trusted models/keys/dev/dev.pub
    done
done
ls -l models/bundles/
