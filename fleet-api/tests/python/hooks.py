"""schemathesis hooks for the fleet's API (loaded by schemathesis.sh via SCHEMATHESIS_HOOKS).

POST /api/v1/models takes a signed model bundle, media type `application/vnd.ember.bundle`.
No JSON Schema can say "a bundle signed by a key the fleet trusts", so the document names the
body by its media type, and this file tells schemathesis how to make valid ones: it draws from
real bundles signed with the development key that `fleet-api/tests/it/python.rs` writes into
the directory named by EMBER_SCHEMATHESIS_BUNDLES (each a distinct model version). Invalid
bodies are still generated from the schema (negative phase) and must be refused.
"""

import os

import schemathesis
from hypothesis import strategies as st

_dir = os.environ.get("EMBER_SCHEMATHESIS_BUNDLES")
if not _dir or not os.path.isdir(_dir):
    raise RuntimeError(
        "EMBER_SCHEMATHESIS_BUNDLES must name a directory of signed .bundle files "
        "(fleet-api/tests/it/python.rs writes one)"
    )
_bundles = []
for name in sorted(os.listdir(_dir)):
    if name.endswith(".bundle"):
        with open(os.path.join(_dir, name), "rb") as f:
            _bundles.append(f.read())
if not _bundles:
    raise RuntimeError(f"no .bundle file in {_dir}")

schemathesis.openapi.media_type(
    "application/vnd.ember.bundle", st.sampled_from(_bundles), aliases=["application/octet-stream"]
)
