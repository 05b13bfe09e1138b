#!/usr/bin/env bash
# End-to-end benchmark on the peers' order-saga workload
# (../shared/peers/WORKLOAD.md): builds in release mode, starts the four
# services as processes in a fresh vhost and fresh databases, places N orders
# over HTTP with C in flight, checks every invariant, prints one JSON line
# (last) with sagas/s and latency percentiles.
#
# Run with: N=10000 C=64 scripts/bench.sh      (REPLICAS=2: two processes per service)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-up.sh 2>/dev/null
cargo build --release --locked -p saga-tests --bins >&2
echo "# durability: PostgreSQL $(psql -h 127.0.0.1 -U postgres -Atc 'show fsync')/fsync, synchronous_commit=$(psql -h 127.0.0.1 -U postgres -Atc 'show synchronous_commit'); RabbitMQ quorum queues, persistent messages, publisher confirms" >&2
exec target/release/saga-bench
