#!/bin/sh
# The glue compose.yaml needs to start the system secure by default, in the
# service image as /usr/local/bin/saga-compose:
#
#   saga-compose secrets        generates every secret once (database and
#                               broker passwords, the card key pair), each
#                               into the volume of whoever needs it only
#   saga-compose broker-setup   declares the topology and creates one broker
#                               user per service with confined permissions
#                               (sagactl broker setup --users-from)
#   saga-compose run CMD...     puts the service's own secrets into its
#                               DATABASE_URL, AMQP_URL and card key, then
#                               runs CMD
set -eu

SECRETS=/run/saga-secrets

# A random password (hex: safe in URLs and SQL).
password() { openssl rand -hex 24; }

# put VOLUME NAME VALUE UID: writes a secret readable by UID only.
put() {
  mkdir -p "/out/$1"
  printf '%s' "$3" > "/out/$1/$2"
  chown "$4" "/out/$1/$2"
  chmod 0400 "/out/$1/$2"
}

case "${1:-}" in
  secrets)
    if [ -f /out/postgres/.generated ]; then
      echo "secrets: already generated"
      exit 0
    fi
    # The images' users: postgres and rabbitmq run as 999, the services as 10001.
    put postgres postgres_password "$(password)" 999
    for role in order_svc payment_svc inventory_svc notification_svc; do
      db=$(password)
      put postgres "$role" "$db" 999
      svc=$(echo "$role" | sed 's/_svc$/-svc/')
      put "$svc" db_password "$db" 10001
    done
    admin=$(password)
    put rabbitmq admin_password "$admin" 999
    put broker-setup admin_password "$admin" 10001
    for user in order_svc payment_svc inventory_svc notification_svc order_client; do
      pass=$(password)
      put broker-setup "$user" "$pass" 10001
      case "$user" in
        *_svc) put "$(echo "$user" | sed 's/_svc$/-svc/')" broker_password "$pass" 10001 ;;
        *) put clients "$user" "$pass" 10001 ;;
      esac
    done
    # The card key pair: the secret half to payment-svc only.
    openssl genpkey -algorithm x25519 -outform DER -out /tmp/card.der
    put payment-svc card_secret_key "$(tail -c 32 /tmp/card.der | base64)" 10001
    put order-svc card_public_key \
      "$(openssl pkey -inform DER -in /tmp/card.der -pubout -outform DER | tail -c 32 | base64)" 10001
    rm -f /tmp/card.der
    touch /out/postgres/.generated
    echo "secrets: generated"
    ;;
  broker-setup)
    AMQP_URL="amqp://admin:$(cat "$SECRETS/admin_password")@${BROKER_HOST:-rabbitmq}:5672/%2f" \
      exec sagactl broker setup --users-from "$SECRETS" \
        --management-url "http://${BROKER_HOST:-rabbitmq}:15672"
    ;;
  run)
    shift
    # user@host → user:password@host, for the service's own user only.
    with_password() { printf '%s' "$1" | sed "s#^\([a-z]*://[^@:/]*\)@#\1:$2@#"; }
    if [ -f "$SECRETS/db_password" ]; then
      DATABASE_URL=$(with_password "$DATABASE_URL" "$(cat "$SECRETS/db_password")")
      export DATABASE_URL
    fi
    if [ -f "$SECRETS/broker_password" ]; then
      AMQP_URL=$(with_password "$AMQP_URL" "$(cat "$SECRETS/broker_password")")
      export AMQP_URL
    fi
    if [ -f "$SECRETS/card_public_key" ]; then
      CARD_SEAL_PUBLIC_KEY=$(cat "$SECRETS/card_public_key")
      export CARD_SEAL_PUBLIC_KEY
    fi
    if [ -f "$SECRETS/card_secret_key" ]; then
      CARD_SEAL_SECRET_KEY=$(cat "$SECRETS/card_secret_key")
      export CARD_SEAL_SECRET_KEY
    fi
    exec "$@"
    ;;
  *)
    echo "usage: saga-compose secrets | broker-setup | run CMD..." >&2
    exit 2
    ;;
esac
