-- A confirmation the mail relay may have taken: an attempt was made whose
-- outcome is not known for sure (a crash, a timeout, a dropped connection).
-- A rollback then sends a cancellation, whatever the status says since.
alter table notifications add column relay_may_have_it boolean not null default false;
update notifications set relay_may_have_it = true where status in ('sending', 'sent');

-- A queued email being handed to the relay, until when (a lease: the
-- sender holds no lock while it talks to the relay). A cancellation queued
-- meanwhile waits for it, so that it never overtakes its confirmation.
alter table deferred_emails add column in_flight_until timestamptz;
