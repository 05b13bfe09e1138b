#!/usr/bin/env bash
# Makes sure the local PostgreSQL and RabbitMQ are up, with RabbitMQ's
# management plugin (the tests create a vhost per test through its API, and
# users watch the queues in its UI). Starts whichever is down. Idempotent.
#
# Run with: scripts/dev-up.sh
set -euo pipefail

log() { printf '[dev-up] %s\n' "$*" >&2; }

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
mgmt_up() { curl -fsS -u guest:guest -o /dev/null http://127.0.0.1:15672/api/overview 2>/dev/null; }

wait_for() { # name, check, seconds
  local name=$1 check=$2 secs=$3 i
  for ((i = 0; i < secs * 5; i++)); do
    if $check; then return 0; fi
    sleep 0.2
  done
  log "$name did not come up within ${secs}s"
  return 1
}

if ! pg_up; then
  log "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null; then
    for v in $(ls /etc/postgresql); do
      pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
    done
  fi
  wait_for PostgreSQL pg_up 60
fi
log "PostgreSQL is up"
# Each service's own role and database (scripts/db-roles.sh).
"$(dirname "$0")/db-roles.sh"

if ! amqp_up; then
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for RabbitMQ amqp_up 120
  rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
log "RabbitMQ is up"

if ! mgmt_up; then
  log "enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable rabbitmq_management >/dev/null
  wait_for "RabbitMQ management API" mgmt_up 120
fi
log "RabbitMQ management UI: http://127.0.0.1:15672 (guest/guest)"
