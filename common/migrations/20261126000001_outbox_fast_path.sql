-- The outbox's fast path publishes right after the commit and deletes each
-- row once the broker confirmed it; a sweeper publishes whatever is left.
-- No transaction NOTIFYs any more: PostgreSQL serialises the commits of
-- notifying transactions on one cluster-wide lock, held through the WAL flush.
drop trigger if exists outbox_notify on outbox;
drop function if exists outbox_notify();

-- The sweeper looks for rows older than a grace period, oldest first.
create index outbox_created_at_idx on outbox (created_at) where published_at is null;
