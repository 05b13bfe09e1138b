-- A decided saga's timeline — order.created, the steps its deciding event
-- carried in its trail, the decision — is written with the decision, on the
-- order's row, by the same statement: no row per step. saga_steps keeps
-- what arrives after the decision (compensations).
alter table orders add column timeline jsonb not null default '[]'::jsonb;
