-- Compensations that kept failing, for an operator to look at and retry.
create table escalations (
    id uuid primary key,
    -- The compensating message (its event id), kept whole so it can be retried.
    message_id uuid not null unique,
    order_id uuid,
    step text not null,
    routing_key text not null,
    body bytea not null,
    attempts integer not null,
    last_error text not null,
    status text not null check (status in ('open', 'retrying', 'resolved')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    resolved_at timestamptz
);
create index escalations_status_idx on escalations (status, created_at);

-- Retention: the cleaner deletes by age in small batches.
create index outbox_published_at_idx on outbox (published_at) where published_at is not null;
create index inbox_received_at_idx on inbox (received_at);
