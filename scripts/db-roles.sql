-- The services' PostgreSQL roles, for a fresh server (compose.yaml runs it
-- at the database's first start). Each service creates its own database as
-- its role, and so owns it and nothing else. On an existing server use
-- scripts/db-roles.sh, which also hands over databases made earlier.
create role order_svc login createdb;
create role payment_svc login createdb;
create role inventory_svc login createdb;
create role notification_svc login createdb;
