#!/usr/bin/env bash
# Sets up a vhost for services that run as confined broker users: declares
# the topology as an administrator (`sagactl broker setup`), then creates one
# user per service and a client user that may only place orders, each with
# exactly the permissions `sagactl broker permissions` prints (its own
# queues, the events it owns, the events it reacts to; see docs/security.md),
# with fresh passwords. Prints the settings that use them: each service's
# AMQP_URL, and the PRODUCER_USERS line every service must get.
#
# Usage: scripts/broker-users.sh [vhost] [host:port]     (default: / 127.0.0.1:5672)
# ADMIN_AMQP_URL: an administrator of the vhost (default guest on host:port).
# Run again to rotate the passwords, and after every upgrade (new queues or
# exchanges). Needs rabbitmqctl on this machine, and sagactl (or cargo).
set -euo pipefail

VHOST=${1:-/}
ADDR=${2:-127.0.0.1:5672}

vhost_enc=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$VHOST")
if [ -n "${SAGACTL:-}" ]; then read -ra sagactl <<<"$SAGACTL"
elif command -v sagactl >/dev/null; then sagactl=(sagactl)
else sagactl=(cargo run -q --manifest-path "$(dirname "$0")/../Cargo.toml" -p sagactl --)
fi

AMQP_URL=${ADMIN_AMQP_URL:-amqp://guest:guest@${ADDR}/${vhost_enc}} "${sagactl[@]}" broker setup

producers=()
urls=()
while IFS=$'\t' read -r -u 3 kind user a b c; do
  case "$kind" in
    permissions)
      pass=$(openssl rand -hex 16)
      if rabbitmqctl -q list_users | awk '{print $1}' | grep -qx "$user"; then
        rabbitmqctl -q change_password "$user" "$pass" >/dev/null
      else
        rabbitmqctl -q add_user "$user" "$pass" >/dev/null
      fi
      rabbitmqctl -q clear_topic_permissions -p "$VHOST" "$user" >/dev/null 2>&1 || true
      rabbitmqctl -q set_permissions -p "$VHOST" "$user" "$a" "$b" "$c" >/dev/null
      urls+=("AMQP_URL for ${user}: amqp://${user}:${pass}@${ADDR}/${vhost_enc}")
      case "$user" in *_svc) producers+=("${user%_svc}-svc=$user") ;; esac
      ;;
    topic)
      rabbitmqctl -q set_topic_permissions -p "$VHOST" "$user" "$a" "$b" "$c" >/dev/null
      ;;
  esac
done 3< <("${sagactl[@]}" broker permissions)
printf '%s\n' "${urls[@]}"
echo "PRODUCER_USERS=$(IFS=,; echo "${producers[*]}")"
