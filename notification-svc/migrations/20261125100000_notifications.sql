-- notification-svc owns the customers' addresses, one notification record per
-- order and every email it sent.

create table customers (
    customer_id text primary key,
    email text not null,
    updated_at timestamptz not null default now()
);

-- One row per order, ever. 'cancelled' is a tombstone written when the saga's
-- rollback arrives before the confirmation request; 'retracted' means the
-- confirmation went out and a cancellation email followed it.
create table notifications (
    order_id uuid primary key,
    customer_id text not null,
    recipient text,
    status text not null check (status in ('sent', 'bounced', 'expired', 'cancelled', 'retracted')),
    reason text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table emails (
    id uuid primary key,
    order_id uuid not null,
    kind text not null check (kind in ('confirmation', 'cancellation')),
    recipient text not null,
    subject text not null,
    body text not null,
    transport text not null,
    sent_at timestamptz not null default now(),
    unique (order_id, kind)
);
