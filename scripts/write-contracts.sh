#!/usr/bin/env bash
# Regenerates every committed contract from the code: docs/openapi/*.json
# (each service's OpenAPI document), docs/schemas/*.json (JSON Schemas of the
# events, the order dict and the result dict) and docs/asyncapi.yaml. The
# contracts' drift tests fail until the regenerated files are committed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test -p common --lib -- --ignored write_schemas write_asyncapi >&2
UPDATE_CONTRACTS=1 cargo test -p saga-tests --test contracts committed_openapi_documents_match_the_code >&2
git status --short docs/openapi docs/schemas docs/asyncapi.yaml
