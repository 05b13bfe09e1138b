-- order-svc owns the orders, their saga timeline and the catalog it prices from.

create table catalog (
    item_id text primary key,
    price_cents bigint not null check (price_cents >= 0),
    updated_at timestamptz not null default now()
);

create table orders (
    order_id uuid primary key,
    customer_id text not null,
    status text not null check (status in ('PENDING', 'CONFIRMED', 'FAILED')),
    items jsonb not null,
    amount_cents bigint not null,
    currency text not null,
    card_brand text not null,
    card_last4 text not null,
    -- The client's idempotency key (HTTP Idempotency-Key or AMQP message_id).
    idempotency_key text unique,
    -- Hash of what was ordered, to spot a key reused for a different order.
    request_fingerprint text not null,
    error text,
    reason text,
    created_at timestamptz not null default now(),
    deadline_at timestamptz not null,
    decided_at timestamptz
);

-- The timeout watcher's scan.
create index orders_pending_deadline_idx on orders (deadline_at) where status = 'PENDING';

-- Each saga's timeline: every event order-svc emitted or observed.
create table saga_steps (
    id bigint generated always as identity primary key,
    order_id uuid not null,
    step text not null,
    event_id uuid,
    source text not null,
    detail text,
    occurred_at timestamptz not null,
    recorded_at timestamptz not null default clock_timestamp()
);
create index saga_steps_order_idx on saga_steps (order_id, id);
create unique index saga_steps_event_idx on saga_steps (order_id, event_id) where event_id is not null;

-- Where to send the result dict of an order placed over AMQP with reply_to.
create table reply_targets (
    order_id uuid not null references orders (order_id),
    reply_to text not null,
    correlation_id text not null,
    created_at timestamptz not null default now(),
    primary key (order_id, reply_to, correlation_id)
);
