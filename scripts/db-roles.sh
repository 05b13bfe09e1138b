#!/usr/bin/env bash
# Gives each service a PostgreSQL role of its own, owning its own database
# and nothing else: order_svc → orders, payment_svc → payments,
# inventory_svc → inventory, notification_svc → notifications. Idempotent:
# creates what is missing, hands a database created earlier by another role
# (and the tables in it) to its service's role, and takes away everyone
# else's right to connect to it. Run by scripts/dev-up.sh.
#
# The roles have no password: the local server trusts 127.0.0.1. In
# production give each a password (or a client certificate) and put it in
# that service's DATABASE_URL (docs/security.md).
#
# Usage: scripts/db-roles.sh          (as a PostgreSQL superuser: PGUSER, default postgres)
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGUSER=${PGUSER:-postgres}
export PGHOST PGUSER
PAIRS=(order_svc:orders payment_svc:payments inventory_svc:inventory notification_svc:notifications)

psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }

for pair in "${PAIRS[@]}"; do
  role=${pair%%:*}; db=${pair##*:}
  psql_q -d postgres <<SQL
do \$\$ begin
  if not exists (select from pg_roles where rolname = '$role') then
    create role $role login createdb;
  end if;
end \$\$;
SQL
  exists=$(psql -X -At -d postgres -c "select 1 from pg_database where datname = '$db'")
  if [ "$exists" = 1 ]; then
    psql_q -d postgres -c "alter database $db owner to $role"
    # What an earlier set-up created as another role becomes the service's.
    psql_q -d "$db" <<SQL
do \$\$ declare r record; begin
  for r in select c.relname, c.relkind from pg_class c
           where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'v', 'm', 'S')
             and pg_get_userbyid(c.relowner) <> '$role'
             and not (c.relkind = 'S' and exists (select from pg_depend d where d.objid = c.oid and d.deptype in ('a', 'i')))
  loop
    execute format('alter %s %I owner to $role',
      case r.relkind when 'S' then 'sequence' when 'v' then 'view' when 'm' then 'materialized view' else 'table' end,
      r.relname);
  end loop;
  for r in select p.oid::regprocedure as f from pg_proc p
           where p.pronamespace = 'public'::regnamespace and pg_get_userbyid(p.proowner) <> '$role'
  loop
    execute format('alter routine %s owner to $role', r.f);
  end loop;
end \$\$;
SQL
  else
    psql_q -d postgres -c "create database $db owner $role"
  fi
  psql_q -d postgres -c "revoke connect on database $db from public" -c "grant connect on database $db to $role"
done
echo "[db-roles] roles order_svc, payment_svc, inventory_svc, notification_svc own their databases" >&2
