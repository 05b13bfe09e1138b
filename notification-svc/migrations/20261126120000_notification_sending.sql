-- 'sending': an email to an external relay is about to go out (or went out
-- and was not recorded yet). Committed before the send, so a crash after the
-- relay took the email still leaves a record that it may have been sent: the
-- redelivery resends it, and a rollback sends a cancellation.
alter table notifications drop constraint notifications_status_check;
alter table notifications add constraint notifications_status_check
    check (status in ('sending', 'sent', 'bounced', 'expired', 'cancelled', 'retracted'));
