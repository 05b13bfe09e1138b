#!/usr/bin/env bash
# Runs the whole system on this machine and shows it at work: brings up
# PostgreSQL and RabbitMQ (with the management UI), builds and starts the four
# services (each creates and migrates its own database), stocks a small shop,
# and places the example order, printing its result dict.
#
# Usage: scripts/run-system.sh [start|stop|status]     (default: start)
#   PROFILE=release scripts/run-system.sh   builds optimised binaries
# Logs: run/logs/<service>.log. The services keep running until `stop`.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-debug}
SERVICES=(order-svc:8080 payment-svc:8081 inventory-svc:8082 notification-svc:8083)
RUN_DIR=run
mkdir -p "$RUN_DIR/logs"

log() { printf '\033[1m[run-system]\033[0m %s\n' "$*" >&2; }

stop() {
  local entry svc pid i
  for entry in "${SERVICES[@]}"; do
    svc=${entry%%:*}
    [ -f "$RUN_DIR/$svc.pid" ] || continue
    pid=$(cat "$RUN_DIR/$svc.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
      log "stopped $svc"
    fi
    rm -f "$RUN_DIR/$svc.pid"
  done
}

status() {
  local entry svc port
  for entry in "${SERVICES[@]}"; do
    svc=${entry%%:*}; port=${entry##*:}
    printf '%-17s %s\n' "$svc" "$(curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null || echo down)"
  done
}

start() {
  scripts/dev-up.sh
  log "building the services ($PROFILE)"
  if [ "$PROFILE" = release ]; then cargo build --release --bins --locked; else cargo build --bins --locked; fi
  stop
  local entry svc port i
  for entry in "${SERVICES[@]}"; do
    svc=${entry%%:*}; port=${entry##*:}
    # DEV_MODE=1: the built-in development card keys and default balances;
    # no API tokens: the HTTP API is open to this machine only (127.0.0.1).
    DEV_MODE=1 HTTP_ADDR="127.0.0.1:$port" nohup "target/$PROFILE/$svc" >"$RUN_DIR/logs/$svc.log" 2>&1 &
    echo $! >"$RUN_DIR/$svc.pid"
  done
  for entry in "${SERVICES[@]}"; do
    svc=${entry%%:*}; port=${entry##*:}
    for ((i = 0; i < 300; i++)); do
      curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null && break
      if ! kill -0 "$(cat "$RUN_DIR/$svc.pid")" 2>/dev/null; then
        log "$svc exited; its log says:"; tail -n 20 "$RUN_DIR/logs/$svc.log" >&2; exit 1
      fi
      sleep 0.2
    done
    curl -fsS -o /dev/null "http://127.0.0.1:$port/health" || { log "$svc is not healthy"; exit 1; }
    log "$svc is up on http://127.0.0.1:$port"
  done

  # A small shop: prices in order-svc's catalog, 100 of each item in stock
  # in inventory-svc (restocked on every start).
  put() { curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' "$1" -d "$2"; }
  put http://127.0.0.1:8080/catalog/productA '{"price_cents": 1500}'
  put http://127.0.0.1:8080/catalog/productB '{"price_cents": 700}'
  put http://127.0.0.1:8082/items/productA '{"available": 100}'
  put http://127.0.0.1:8082/items/productB '{"available": 100}'
  # The example customer's balance (10,000.00), so repeated runs keep working.
  put http://127.0.0.1:8081/accounts/user123 '{"balance_cents": 1000000}'

  local order='{"customer_id": "user123",
  "items": [{"item_id": "productA", "quantity": 2}, {"item_id": "productB", "quantity": 1}],
  "payment_info": {"card_number": "4242 4242 4242 4242", "expiry_date": "12/30", "cvv": "123"}}'
  log "placing the example order: POST http://127.0.0.1:8080/orders"
  printf '%s\n' "$order" >&2
  local result
  result=$(curl -sS -H 'content-type: application/json' http://127.0.0.1:8080/orders -d "$order")
  printf '\n%s\n\n' "$result"

  log "and one with a card that declines (test card 4000 0000 0000 0002):"
  curl -sS -H 'content-type: application/json' http://127.0.0.1:8080/orders \
    -d "${order/4242 4242 4242 4242/4000 0000 0000 0002}"
  printf '\n\n'

  local id
  id=$(printf '%s' "$result" | sed -n 's/.*"order_id":"\([^"]*\)".*/\1/p')
  if [ -n "$id" ]; then
    log "the saga's timeline:    curl http://127.0.0.1:8080/sagas/$id   (all four services)"
    log "the order:              curl http://127.0.0.1:8080/orders/$id"
    log "the payment:            curl http://127.0.0.1:8081/payments/$id"
    log "the confirmation email: curl 'http://127.0.0.1:8083/emails?order_id=$id'"
  fi
  log "stock:                  curl http://127.0.0.1:8082/items/productA"
  log "metrics:                curl http://127.0.0.1:808{0,1,2,3}/metrics"
  log "queues:                 http://127.0.0.1:15672 (guest/guest)"
  log "Saga Explorer:          http://127.0.0.1:8080/explorer"
  log "logs in $RUN_DIR/logs/; stop with: scripts/run-system.sh stop"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
