#!/usr/bin/env python3
"""Places an order over AMQP, as any client outside Rust would, and prints
the result dict.

It publishes the mission's order dict to the topic exchange `saga.events`
with routing key `order.requested`, a `message_id` (the idempotency key),
`reply_to` (a queue of its own) and `correlation_id`, then prints each reply:
`{"status": "success", "order_id": ...}` or
`{"status": "failure", "order_id": ..., "error": ..., "reason": ...}` — or
first `{"status": "pending", ...}` for a long-running order, then its final
result. See docs/events.md, "Placing an order over AMQP".

    pip install pika
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 examples/python/place_order.py [ORDER.json]

Exit code: 0 success, 1 failure, 2 no final answer within the timeout.
"""

import json
import os
import sys
import uuid

import pika

ORDER = {
    "customer_id": "user123",
    "items": [
        {"item_id": "productA", "quantity": 2},
        {"item_id": "productB", "quantity": 1},
    ],
    "payment_info": {
        "card_number": "4242 4242 4242 4242",
        "expiry_date": "12/30",
        "cvv": "123",
    },
}


def main() -> int:
    order = ORDER
    if len(sys.argv) > 1:
        with open(sys.argv[1], encoding="utf-8") as f:
            order = json.load(f)
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    # A cluster's node list: any node will do for a client.
    url = url.split(",")[0].strip()
    timeout = float(os.environ.get("ORDER_TIMEOUT_SECS", "30"))
    key = os.environ.get("ORDER_KEY", str(uuid.uuid4()))

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    reply_queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    channel.confirm_delivery()
    channel.basic_publish(
        exchange="saga.events",
        routing_key="order.requested",
        body=json.dumps(order).encode(),
        properties=pika.BasicProperties(
            message_id=key,
            correlation_id=key,
            reply_to=reply_queue,
            content_type="application/json",
            delivery_mode=2,
        ),
        mandatory=True,
    )

    status = 2
    for _method, properties, body in channel.consume(
        reply_queue, auto_ack=True, inactivity_timeout=timeout
    ):
        if body is None:
            print("no answer within the timeout", file=sys.stderr)
            break
        if properties.correlation_id != key:
            continue
        result = json.loads(body)
        print(json.dumps(result), flush=True)
        if result.get("status") == "success":
            status = 0
            break
        if result.get("status") == "failure":
            status = 1
            break
        # "pending": a long-running order; its final result follows.
    channel.cancel()
    connection.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
