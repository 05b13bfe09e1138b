-- A payment never credits: its amount is positive (0 only for the tombstone
-- of a payment cancelled before it happened). Balances stay far below the
-- bigint limit (MAX_BALANCE_CENTS), so refunds cannot overflow.
alter table payments add constraint payments_amount_not_negative check (amount_cents >= 0);
