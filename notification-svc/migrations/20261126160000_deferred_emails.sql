-- A confirmation queued while the mail relay is down: the saga is confirmed
-- (past the pivot) and the email retried until it goes out.
alter table notifications drop constraint notifications_status_check;
alter table notifications add constraint notifications_status_check
    check (status in ('sending', 'sent', 'bounced', 'expired', 'cancelled', 'retracted', 'deferred'));

create table deferred_emails (
    order_id uuid primary key,
    email_id uuid not null,
    kind text not null,
    recipient text not null,
    subject text not null,
    body text not null,
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error text,
    created_at timestamptz not null default now()
);
create index deferred_emails_due_idx on deferred_emails (next_attempt_at);
