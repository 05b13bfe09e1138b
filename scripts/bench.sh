#!/usr/bin/env bash
# End-to-end benchmark on the peers' order-saga workload
# (../shared/peers/WORKLOAD.md): builds in release mode, starts the four
# services as processes in a fresh vhost and fresh databases, warms up,
# places N orders over HTTP with C in flight, checks every invariant, and
# prints a summary (stderr) and one JSON line last (stdout) with sagas/s,
# latency percentiles, CPU, commits and messages per saga.
#
# Run with: N=10000 C=64 scripts/bench.sh      (REPLICAS=2: two processes per service)
# Extra arguments go to saga-bench (e.g. --entry amqp, --rate 300, --find-knee,
# --plot target/bench); `target/release/saga-bench --help` lists them. Without
# --spawn, saga-bench measures a system that is already running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-up.sh 2>/dev/null
cargo build --release --locked -p saga-tests --bins >&2
echo "# durability: PostgreSQL fsync=$(psql -h 127.0.0.1 -U postgres -Atc 'show fsync'), synchronous_commit=$(psql -h 127.0.0.1 -U postgres -Atc 'show synchronous_commit'); RabbitMQ ${QUEUE_TYPE:-quorum} queues, persistent messages, publisher confirms" >&2
# CLUSTER=1: on the local 3-node RabbitMQ cluster (started here).
cluster=()
if [[ "${CLUSTER:-0}" == 1 ]]; then
  scripts/cluster-up.sh >/dev/null
  cluster=(--cluster)
fi
exec target/release/saga-bench --spawn "${cluster[@]}" --orders "${N:-10000}" --concurrency "${C:-64}" --replicas "${REPLICAS:-1}" "$@"
