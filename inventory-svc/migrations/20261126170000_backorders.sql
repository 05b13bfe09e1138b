-- Items that may be sold before they are in stock: an order short of them
-- waits (under its long deadline) until they arrive.
alter table stock add column backorderable boolean not null default false;

alter table reservations drop constraint reservations_status_check;
alter table reservations add constraint reservations_status_check
    check (status in ('held', 'committed', 'released', 'rejected', 'cancelled', 'backordered'));
-- What inventory.reserved will carry once the stock arrives, with the
-- saga's context (long deadline, trail).
alter table reservations add column pending jsonb;
create index reservations_backordered_idx on reservations (created_at) where status = 'backordered';
