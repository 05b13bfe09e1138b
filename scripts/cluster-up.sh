#!/usr/bin/env bash
# A local 3-node RabbitMQ cluster for trying (and testing) the system on a
# cluster, beside the machine's own RabbitMQ (5672), which it leaves alone.
#
#   scripts/cluster-up.sh          # start (or restart the nodes that are down), cluster, print AMQP_URL
#   scripts/cluster-up.sh stop     # stop the three nodes
#
# Node i (1..3): name saga-i@localhost, AMQP 127.0.0.1:568i, management
# 127.0.0.1:1568i, distribution port 2568i, data and logs under
# run/cluster/saga-i (the commands' output in run/cluster/cluster-up.log).
# User guest/guest (loopback only). The last line printed is the AMQP_URL
# list of the default vhost. Quorum queues get every node (RabbitMQ's
# default); QUORUM_INITIAL_GROUP_SIZE on the services sets another size for
# queues declared from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT="$PWD/run/cluster"
mkdir -p "$ROOT"
NODES=(1 2 3)
log() { printf '[cluster-up] %s\n' "$*" >&2; }

node_env() { # i -> the environment of node i
  local i=$1 dir="$ROOT/saga-$i"
  echo "RABBITMQ_NODENAME=saga-$i@localhost"
  echo "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1"
  echo "RABBITMQ_NODE_PORT=568$i"
  echo "RABBITMQ_DIST_PORT=2568$i"
  echo "RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf"
  echo "RABBITMQ_CONFIG_FILE=$dir/rabbitmq"
  echo "RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins"
  echo "RABBITMQ_MNESIA_BASE=$dir/mnesia"
  echo "RABBITMQ_LOG_BASE=$dir/log"
  echo "RABBITMQ_PID_FILE=$dir/pid"
  echo "RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced.config"
  echo "ERL_EPMD_ADDRESS=127.0.0.1"
}

ctl() { # i, rabbitmqctl args...
  local i=$1; shift
  rabbitmqctl -n "saga-$i@localhost" "$@"
}

running() { ctl "$1" status >/dev/null 2>&1; }

start_node() {
  local i=$1 dir="$ROOT/saga-$i"
  mkdir -p "$dir/mnesia" "$dir/log"
  : > "$dir/rabbitmq-env.conf"
  printf 'listeners.tcp.default = 127.0.0.1:568%s\nmanagement.tcp.port = 1568%s\nmanagement.tcp.ip = 127.0.0.1\nloopback_users.guest = true\n' "$i" "$i" \
    > "$dir/rabbitmq.conf"
  echo '[].' > "$dir/advanced.config"
  echo '[rabbitmq_management].' > "$dir/enabled_plugins"
  if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq:rabbitmq "$ROOT"; fi
  log "starting saga-$i (AMQP 127.0.0.1:568$i, management 127.0.0.1:1568$i)"
  env $(node_env "$i") rabbitmq-server -detached >>"$ROOT/cluster-up.log" 2>&1
}

wait_node() {
  local i=$1 n
  for ((n = 0; n < 120; n++)); do
    if ctl "$i" await_startup --timeout 5 >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "saga-$i did not start; see $ROOT/saga-$i/log"
  return 1
}

if [[ "${1:-}" == "stop" ]]; then
  for i in "${NODES[@]}"; do
    if running "$i"; then log "stopping saga-$i"; ctl "$i" stop >/dev/null 2>&1 || true; fi
  done
  exit 0
fi

for i in "${NODES[@]}"; do
  running "$i" || start_node "$i"
done
for i in "${NODES[@]}"; do wait_node "$i"; done

# Nodes 2 and 3 join node 1 (a node that is a member already is left alone;
# one that restarted rejoins by itself).
for i in 2 3; do
  if ! ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "saga-$i@localhost.*running_nodes\|running_nodes.*saga-$i@localhost"; then
    if ! ctl "$i" cluster_status --formatter json 2>/dev/null | grep -q '"saga-1@localhost"'; then
      log "saga-$i joins saga-1"
      {
        ctl "$i" stop_app
        ctl "$i" reset
        ctl "$i" join_cluster saga-1@localhost
        ctl "$i" start_app
      } >>"$ROOT/cluster-up.log" 2>&1
    fi
  fi
done

# All three running, as the cluster sees it.
for ((n = 0; n < 60; n++)); do
  running_nodes=$(ctl 1 cluster_status --formatter json 2>/dev/null \
    | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null || echo 0)
  [[ "$running_nodes" == 3 ]] && break
  sleep 1
done
if [[ "${running_nodes:-0}" != 3 ]]; then
  log "the cluster has ${running_nodes:-0} running nodes, not 3"
  exit 1
fi
log "3 nodes running; management UI: http://127.0.0.1:15681 (guest/guest)"
echo "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
