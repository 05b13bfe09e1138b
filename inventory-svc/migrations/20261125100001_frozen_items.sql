-- A frozen item (e.g. during a stocktake) can neither be reserved nor have
-- units released back: a release fails and is retried, then escalated.
alter table stock add column frozen boolean not null default false;
