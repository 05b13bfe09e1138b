-- Everything a decision needs is on the order's row, so deciding a batch of
-- sagas reads nothing else: the first AMQP client's reply target (later ones
-- go to reply_targets, flagged here), and the queue of the order-svc replica
-- whose HTTP request waits for the result (told directly when another
-- replica decides).
alter table orders
    add column reply_to text,
    add column reply_correlation_id text,
    add column extra_reply_targets boolean not null default false,
    add column waiter text;
