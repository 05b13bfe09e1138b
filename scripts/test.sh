#!/usr/bin/env bash
# Runs every test: unit tests of each crate and the end-to-end saga tests
# against the local RabbitMQ and PostgreSQL (started if needed).
#
# Run with: scripts/test.sh  (extra arguments go to `cargo test`)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/dev-up.sh
# Prometheus/promtool, Chromium and ChromeDriver, Compose: the ops and
# explorer tests use them (Debian packages and a registry; quick once there).
scripts/test-deps.sh
# The saga tests are I/O bound; 3 at a time keeps the PostgreSQL connections
# of all running test systems well under the server's max_connections (100).
exec cargo test --workspace --locked "$@" -- --test-threads="${TEST_THREADS:-3}"
