#!/usr/bin/env bash
# Creates one RabbitMQ user per service on a vhost (and a client user that
# may only place orders), with fresh passwords, and prints the settings that
# use them: each service's AMQP_URL, and the PRODUCER_USERS line every
# service must get. With them, a service applies an internal event only if
# the user of the service that owns it published it (docs/security.md) —
# and the broker's topic permissions already refuse, say, payment_svc
# publishing `order.*` to saga.events.
#
# Usage: scripts/broker-users.sh [vhost] [host:port]     (default: / 127.0.0.1:5672)
# Run again to rotate the passwords. Needs rabbitmqctl on this machine.
set -euo pipefail

VHOST=${1:-/}
ADDR=${2:-127.0.0.1:5672}
EXCHANGE=saga.events
# user:routing keys it may publish to saga.events
USERS=("order_svc:^order\\.(created|confirmed|failed|cancelled)$"
       "payment_svc:^payment\\."
       "inventory_svc:^inventory\\."
       "notification_svc:^notification\\."
       "order_client:^order\\.requested$")

vhost_enc=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$VHOST")
producers=()
for entry in "${USERS[@]}"; do
  user=${entry%%:*}; keys=${entry#*:}
  pass=$(openssl rand -hex 16)
  if rabbitmqctl -q list_users | awk '{print $1}' | grep -qx "$user"; then
    rabbitmqctl -q change_password "$user" "$pass" >/dev/null
  else
    rabbitmqctl -q add_user "$user" "$pass" >/dev/null
  fi
  if [ "$user" = order_client ]; then
    # Publish orders; declare, read and delete its own reply queues only.
    rabbitmqctl -q set_permissions -p "$VHOST" "$user" '^amq\.gen-.*' "^($EXCHANGE|amq\\.gen-.*)\$" '^amq\.gen-.*' >/dev/null
  else
    rabbitmqctl -q set_permissions -p "$VHOST" "$user" '.*' '.*' '.*' >/dev/null
    svc=${user%_svc}-svc
    producers+=("$svc=$user")
  fi
  rabbitmqctl -q set_topic_permissions -p "$VHOST" "$user" "$EXCHANGE" "$keys" '.*' >/dev/null
  echo "AMQP_URL for ${user}: amqp://${user}:${pass}@${ADDR}/${vhost_enc}"
done
echo "PRODUCER_USERS=$(IFS=,; echo "${producers[*]}")"
