-- payment-svc owns the customers' ledger and one payment record per order.

create table accounts (
    customer_id text primary key,
    balance_cents bigint not null check (balance_cents >= 0),
    updated_at timestamptz not null default now()
);

-- One row per order, ever: the primary key is what makes a double charge
-- impossible. 'cancelled' is a tombstone written when the saga's rollback
-- arrives before the charge request, so a late order.created is not applied.
create table payments (
    order_id uuid primary key,
    customer_id text not null,
    amount_cents bigint not null,
    currency text not null,
    status text not null check (status in ('charged', 'declined', 'refunded', 'cancelled')),
    decline_code text,
    reason text,
    card_brand text,
    card_last4 text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
