#!/usr/bin/env bash
# Property-based tests of a running fleet's API against its own OpenAPI document: every
# check (server errors, status codes, content types, response schemas, accepting valid and
# rejecting invalid input, auth) over generated requests, including stateful sequences, with
# no per-operation exemption. hooks.py supplies valid model bundles for the one body type no
# JSON Schema can describe (EMBER_SCHEMATHESIS_BUNDLES names their directory).
#
#   EMBER_SCHEMATHESIS_BUNDLES=DIR bash fleet-api/tests/python/schemathesis.sh \
#     http://127.0.0.1:8080 <admin token> [max examples]
#
# Run it from a scratch directory: schemathesis writes .hypothesis/ and .schemathesis/ there.
set -euo pipefail
base=$1
token=$2
examples=${3:-50}
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export SCHEMATHESIS_HOOKS=hooks
exec python3 -m schemathesis.cli run "$base/api/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$examples" \
  --seed 1 \
  --generation-database none \
  --workers 2 \
  --no-color
