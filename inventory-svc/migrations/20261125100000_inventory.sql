-- inventory-svc owns the stock and one reservation per order.
--
-- Reserve-then-commit: a reservation moves units from `available` to `held`
-- (atomically, never below zero); order.confirmed commits them (held -> sold),
-- a rollback releases them (held -> available).

create table stock (
    item_id text primary key,
    available integer not null check (available >= 0),
    held integer not null default 0 check (held >= 0),
    updated_at timestamptz not null default now()
);

-- One row per order, ever. 'cancelled' is a tombstone written when the
-- saga's rollback arrives before the reservation request.
create table reservations (
    order_id uuid primary key,
    status text not null check (status in ('held', 'committed', 'released', 'rejected', 'cancelled')),
    reason text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table reservation_lines (
    order_id uuid not null references reservations (order_id),
    item_id text not null,
    quantity integer not null check (quantity > 0),
    primary key (order_id, item_id)
);
