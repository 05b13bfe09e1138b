-- Stock held for a saga that waits for its payment's 3-D Secure
-- confirmation: held until expires_at (the saga's long deadline) and not
-- announced (inventory.reserved) until the payment is confirmed.
alter table reservations add column awaiting_payment boolean not null default false;
alter table reservations add column expires_at timestamptz;
create index reservations_expiring_idx on reservations (expires_at)
    where awaiting_payment and status = 'held';
