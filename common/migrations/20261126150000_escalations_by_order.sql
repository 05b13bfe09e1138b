-- A saga's escalations, for its step log (GET /sagas/{id}/steps).
create index if not exists escalations_order_idx on escalations (order_id);
