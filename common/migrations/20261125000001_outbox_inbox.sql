-- Shared by every service (merged into each service's migrator by common::db).

-- Transactional outbox: rows are inserted in the same transaction as the state
-- change that caused them, and published by the relay with publisher confirms.
create table outbox (
    id uuid primary key,                        -- AMQP message_id (= event_id)
    seq bigint generated always as identity,    -- publish order
    exchange text not null,
    routing_key text not null,
    message_type text not null,
    correlation_id text,
    traceparent text,
    mandatory boolean not null default true,
    payload jsonb not null,
    created_at timestamptz not null default now(),
    published_at timestamptz,
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error text
);

-- The relay only ever scans unpublished rows.
create index outbox_unpublished_idx on outbox (seq) where published_at is null;

-- Wake the relay on commit (NOTIFY is delivered at commit, once per channel
-- and payload per transaction); the relay also polls, so a lost notification
-- only delays a row, it never strands it.
create function outbox_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('outbox', '');
    return null;
end
$$;

create trigger outbox_notify after insert on outbox
    for each statement execute function outbox_notify();

-- Dedup inbox: the id of every message a handler applied, recorded in the same
-- transaction as its effects.
create table inbox (
    message_id uuid primary key,
    message_type text not null,
    received_at timestamptz not null default now()
);
