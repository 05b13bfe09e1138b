-- A frozen account can neither be charged nor credited (e.g. blocked by the
-- bank): a refund to it fails and is retried, then escalated.
alter table accounts add column frozen boolean not null default false;
