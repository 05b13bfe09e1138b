-- A saga waiting for an outside answer (a 3-D Secure confirmation) under its
-- long deadline: what it waits for (null for every ordinary saga). Its
-- deadline_at is then the long deadline.
alter table orders add column awaiting text;

-- Long-running sagas the reconciler passed while they waited: checked once
-- decided (its watermark does not wait for them).
create table reconcile_later (order_id uuid primary key);
