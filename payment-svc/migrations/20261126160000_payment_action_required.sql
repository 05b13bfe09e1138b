-- A payment that needs the customer's 3-D Secure confirmation: nothing is
-- charged while it is action_required; the gateway's answer confirms
-- (charged) or declines it, or the saga's rollback voids it (voided).
alter table payments drop constraint payments_status_check;
alter table payments add constraint payments_status_check
    check (status in ('charged', 'declined', 'refunded', 'cancelled', 'action_required', 'voided'));
-- Until when the confirmation is accepted (the saga's long deadline), and
-- what payment.completed then carries (no card data).
alter table payments add column action_deadline_at timestamptz;
alter table payments add column completion jsonb;
