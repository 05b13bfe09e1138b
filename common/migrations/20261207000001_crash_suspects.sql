-- Messages delivered again after the process may have crashed on them,
-- by a digest of their routing key and body: how many times each was
-- handled as a suspect. Only the one that keeps crashing the process while
-- handled on its own is parked (messaging::crash_loop), whatever the
-- broker's count of deliveries says.
create table crash_suspects (
    id uuid primary key,
    times integer not null,
    last_seen timestamptz not null default now()
);
