-- The sweeper finds old rows through the unpublished index on seq (rows
-- live a fraction of a second on the fast path): one index less to keep up
-- on every insert.
drop index if exists outbox_created_at_idx;
