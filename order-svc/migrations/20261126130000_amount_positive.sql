-- Every order charges something: a non-positive amount would credit the
-- customer at payment-svc (which refuses it too).
alter table orders add constraint orders_amount_positive check (amount_cents > 0);
