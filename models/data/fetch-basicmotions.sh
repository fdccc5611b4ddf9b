#!/usr/bin/env bash
# Re-extracts BasicMotions_{TRAIN,TEST}.ts from the sktime 1.2.0 wheel on PyPI into this
# directory and checks them against SHA256SUMS. Needs pip, unzip and sha256sum.
#
#   models/data/fetch-basicmotions.sh          # extract and check
#   models/data/fetch-basicmotions.sh --check  # only check the committed files
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="1.2.0"
member_dir="sktime/datasets/data/BasicMotions"

if [[ "${1:-}" != "--check" ]]; then
    for tool in pip unzip sha256sum; do
        command -v "$tool" >/dev/null || { echo "fetch-basicmotions: $tool is required" >&2; exit 1; }
    done
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "sktime==${version}"
    wheel="$(ls "$tmp"/sktime-"${version}"-*.whl)"
    unzip -q -o "$wheel" "${member_dir}/BasicMotions_TRAIN.ts" "${member_dir}/BasicMotions_TEST.ts" -d "$tmp"
    cp "$tmp/${member_dir}/BasicMotions_TRAIN.ts" "$tmp/${member_dir}/BasicMotions_TEST.ts" "$here/"
    echo "fetch-basicmotions: extracted from $(basename "$wheel")"
fi

cd "$here"
sha256sum --check --strict SHA256SUMS
