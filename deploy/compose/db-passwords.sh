#!/bin/sh
# Run by the postgres image at the database's first start, after
# scripts/db-roles.sql: gives each service's role the password
# `saga-compose secrets` generated for it.
set -eu
for role in order_svc payment_svc inventory_svc notification_svc; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "alter role $role password '$(cat "/run/saga-secrets/$role")'"
done
