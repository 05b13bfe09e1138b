-- An outbox row keeps the message's exact bytes: serialised once by the
-- service, published as they are, and never parsed by PostgreSQL (jsonb
-- parsing of every event was measurable CPU). Older rows keep `payload`.
alter table outbox add column body bytea;
alter table outbox alter column payload drop not null;
