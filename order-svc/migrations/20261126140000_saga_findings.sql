-- What the invariant reconciler found: a decided saga that other services
-- disagree with (e.g. FAILED but still charged). Open while resolved_at is
-- null; one row per saga and kind.
create table saga_findings (
    order_id uuid not null,
    kind text not null,
    detail text not null,
    found_at timestamptz not null default now(),
    checked_at timestamptz not null default now(),
    resolved_at timestamptz,
    primary key (order_id, kind)
);
create index saga_findings_open_idx on saga_findings (found_at) where resolved_at is null;

-- How far the reconciler has checked sagas, by order id (UUIDv7: creation
-- order, so the primary key walks them without an index on the hot table).
create table reconciler_progress (
    id boolean primary key default true check (id),
    last_order_id uuid not null
);
