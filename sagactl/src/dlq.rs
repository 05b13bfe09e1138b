//! `dlq list|show|replay|purge`: the parking queues (`<service>.parking`).
//!
//! Reading never consumes: every message of a queue is fetched with
//! `basic.get` (unacknowledged) and, at the end, handed back with one
//! `basic.nack(multiple, requeue)`, which puts each back where it was
//! (RabbitMQ 4.3+ does not count a nack as a failed delivery). If sagactl
//! dies half-way, the broker requeues them when the channel closes.
//!
//! A replay publishes the parked message again, with publisher confirms,
//! and acks the parked copy only once the broker confirmed the new one: a
//! crash in between leaves the parked copy in place, and replaying it again
//! is harmless because the services recognise what they already applied.

use std::io::{BufRead as _, Write as _};

use anyhow::Context as _;
use common::messaging::delivery::{
    CONTROL_HEADERS, H_DELIVERY_COUNT, H_LAST_ERROR, H_ORIGINAL_EXCHANGE, H_ORIGINAL_ROUTING_KEY,
    H_PARKED_AT, H_PARKED_BY, H_PARKED_REASON, H_PARKED_SENDER, H_RETRY_ATTEMPT, header,
};
use common::messaging::events::{EXCHANGE, EventType, REQUEUE_EXCHANGE};
use common::messaging::topology::ServiceIdentity;
use common::messaging::trust;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::{Map, Value, json};

use crate::api::{service_named, services};
use crate::failure::Failure;
use crate::output::{Table, clean, cut, print_json, text};

/// Headers the broker or the parking service added, dropped from a replay:
/// it starts afresh (a stale `x-delivery-count` would even make the service
/// take it for a crash loop).
const DROPPED_ON_REPLAY: [&str; 16] = [
    H_PARKED_REASON,
    H_PARKED_BY,
    H_PARKED_AT,
    H_PARKED_SENDER,
    H_RETRY_ATTEMPT,
    H_LAST_ERROR,
    H_DELIVERY_COUNT,
    "x-acquired-count",
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    "x-opt-deaths",
];

/// The broker, as `AMQP_URL` names it.
pub struct Broker {
    url: String,
}

impl Broker {
    pub fn new(url: String) -> Broker {
        Broker { url }
    }

    /// The user this connects as.
    pub fn user(&self) -> String {
        trust::amqp_user(&self.url)
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        let shown = redact(&self.url);
        let connect = Connection::connect(&self.url, ConnectionProperties::default());
        let conn = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
            .await
            .map_err(|_| anyhow::anyhow!("connecting to the broker at {shown}: timed out"))?;
        conn.map_err(|e| {
            let text = e.to_string();
            if protocol_code(&e) == Some(403) || text.contains("ACCESS_REFUSED") {
                Failure::Refused(format!(
                    "the broker at {shown} refused user {:?} ({text}): check AMQP_URL's user, \
                     password and vhost",
                    self.user()
                ))
                .into()
            } else {
                anyhow::anyhow!("connecting to the broker at {shown}: {text}")
            }
        })
    }
}

/// The reply code of a broker error (403 access refused, 404 not found,
/// 406 precondition failed), if it is one.
fn protocol_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// An AMQP URL with its password hidden.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// One parked message, fetched and not yet settled.
pub struct Parked {
    /// 1-based position in its queue when fetched.
    pub position: usize,
    pub delivery: Delivery,
    settled: bool,
}

impl Parked {
    fn headers(&self) -> FieldTable {
        self.delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default()
    }

    fn header(&self, key: &str) -> Option<String> {
        header(&self.headers(), key)
    }

    pub fn message_id(&self) -> Option<String> {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string)
    }

    /// Whether `selector` (a message id, or `#N`) names this message.
    fn matches(&self, selector: &str) -> bool {
        match selector.strip_prefix('#').map(str::parse::<usize>) {
            Some(Ok(n)) => n == self.position,
            _ => self.message_id().as_deref() == Some(selector),
        }
    }

    /// The routing key it was first published with.
    fn original_routing_key(&self) -> Option<String> {
        original_routing_key(&self.headers(), self.delivery.routing_key.as_str())
    }

    /// Its event type: the AMQP `type`, else the envelope's `event_type`.
    fn event_type(&self) -> Option<String> {
        self.delivery
            .properties
            .kind()
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| {
                serde_json::from_slice::<Value>(&self.delivery.data)
                    .ok()?
                    .get("event_type")?
                    .as_str()
                    .map(str::to_owned)
            })
    }

    /// Why it is parked: `x-parked-reason`, or the broker's dead-lettering
    /// reason (a crash loop hitting the delivery limit).
    fn reason(&self) -> String {
        self.header(H_PARKED_REASON)
            .unwrap_or_else(|| match self.header("x-first-death-reason") {
                Some(r) if r == "delivery_limit" => "dead-lettered by the broker: delivered too \
                                                    often without being settled (crash loop)"
                    .to_owned(),
                Some(r) => format!("dead-lettered by the broker ({r})"),
                None => "(no reason recorded)".to_owned(),
            })
    }

    fn parked_at(&self) -> Option<String> {
        self.header(H_PARKED_AT).or_else(|| {
            let deaths = self.headers();
            let first = match deaths.inner().get("x-death") {
                Some(AMQPValue::FieldArray(a)) => a.as_slice().first().cloned(),
                _ => None,
            };
            match first {
                Some(AMQPValue::FieldTable(t)) => match t.inner().get("time") {
                    Some(AMQPValue::Timestamp(ts)) => {
                        chrono::DateTime::from_timestamp(i64::try_from(*ts).ok()?, 0)
                            .map(|t| t.to_rfc3339())
                    }
                    _ => None,
                },
                _ => None,
            }
        })
    }

    /// Whether its card data was removed before it was parked (replaying it
    /// cannot succeed).
    fn redacted(&self) -> bool {
        serde_json::from_slice::<Value>(&self.delivery.data)
            .ok()
            .is_some_and(|v| v.get("redacted").is_some())
    }

    fn summary(&self, service: &ServiceIdentity) -> Value {
        json!({
            "service": service.name,
            "position": self.position,
            "message_id": self.message_id(),
            "type": self.event_type(),
            "routing_key": self.original_routing_key(),
            "reason": self.reason(),
            "parked_at": self.parked_at(),
            "parked_by": self.header(H_PARKED_BY),
            "sender": self.header(H_PARKED_SENDER)
                .or_else(|| self.delivery.properties.user_id().as_ref().map(ToString::to_string)),
            "bytes": self.delivery.data.len(),
        })
    }

    fn detail(&self, service: &ServiceIdentity) -> Value {
        let p = &self.delivery.properties;
        let s = |v: &Option<ShortString>| v.as_ref().map(ToString::to_string);
        let body = match serde_json::from_slice::<Value>(&self.delivery.data) {
            Ok(v) => v,
            Err(_) => Value::from(String::from_utf8_lossy(&self.delivery.data).into_owned()),
        };
        let mut out = self.summary(service);
        if let Value::Object(map) = &mut out {
            map.insert(
                "properties".into(),
                json!({
                    "message_id": s(p.message_id()),
                    "type": s(p.kind()),
                    "correlation_id": s(p.correlation_id()),
                    "reply_to": s(p.reply_to()),
                    "user_id": s(p.user_id()),
                    "content_type": s(p.content_type()),
                    "delivery_mode": p.delivery_mode(),
                    "timestamp": p.timestamp(),
                    "app_id": s(p.app_id()),
                }),
            );
            map.insert("headers".into(), table_json(&self.headers()));
            map.insert("body".into(), body);
        }
        out
    }
}

/// The routing key a message was first published with: the consumer's
/// `x-original-routing-key`, else the one recorded by the broker when it
/// dead-lettered it, else the one it carries.
fn original_routing_key(headers: &FieldTable, delivered_with: &str) -> Option<String> {
    if let Some(key) = header(headers, H_ORIGINAL_ROUTING_KEY) {
        return Some(key);
    }
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") {
        for death in deaths.as_slice() {
            let AMQPValue::FieldTable(death) = death else {
                continue;
            };
            if let Some(AMQPValue::FieldArray(keys)) = death.inner().get("routing-keys") {
                for key in keys.as_slice() {
                    if let Some(key) = common::messaging::delivery::amqp_str(key)
                        && EventType::from_routing_key(&key).is_some()
                    {
                        return Some(key);
                    }
                }
            }
        }
    }
    EventType::from_routing_key(delivered_with).map(|_| delivered_with.to_owned())
}

/// A header table as JSON.
fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.to_string(), amqp_json(v)))
            .collect::<Map<_, _>>(),
    )
}

fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(n) => Value::from(*n),
        AMQPValue::Double(n) => Value::from(*n),
        AMQPValue::Timestamp(ts) => i64::try_from(*ts)
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .map_or_else(|| Value::from(*ts), |t| Value::from(t.to_rfc3339())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => {
            common::messaging::delivery::amqp_str(v).map_or(Value::Null, Value::from)
        }
        AMQPValue::ByteArray(b) => Value::from(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::DecimalValue(d) => Value::from(format!("{d:?}")),
        AMQPValue::Void => Value::Null,
    }
}

/// A parking queue's messages, fetched and held (unacknowledged) on a
/// channel of its own until [`Snapshot::release`].
struct Snapshot {
    service: ServiceIdentity,
    channel: Channel,
    /// Messages in the queue when it was read.
    count: u32,
    messages: Vec<Parked>,
}

impl Snapshot {
    /// Fetches up to `limit` messages (all if `None`) of `service`'s
    /// parking queue, never more than were there when it started: copies
    /// parked again meanwhile (by a replay) are left alone.
    async fn take(
        conn: &Connection,
        service: ServiceIdentity,
        limit: Option<usize>,
    ) -> anyhow::Result<Snapshot> {
        let queue = service.parking_queue();
        let channel = conn
            .create_channel()
            .await
            .context("opening a broker channel")?;
        let count = ready_count(&channel, &queue)
            .await
            .map_err(|e| match protocol_code(&e) {
                Some(404) => anyhow::anyhow!(
                    "there is no queue {queue} on this vhost: is AMQP_URL's vhost the services' \
                     (have they ever started)?"
                ),
                Some(403) => {
                    Failure::Refused(format!("the broker refused access to {queue}: {e}")).into()
                }
                _ => anyhow::anyhow!("looking up {queue}: {e}"),
            })?;
        let wanted = limit.map_or(count as usize, |l| l.min(count as usize));
        let mut messages = Vec::with_capacity(wanted);
        while messages.len() < wanted {
            let got = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .with_context(|| format!("reading {queue}"))?;
            let Some(got) = got else { break };
            messages.push(Parked {
                position: messages.len() + 1,
                delivery: got.delivery,
                settled: false,
            });
        }
        Ok(Snapshot {
            service,
            channel,
            count,
            messages,
        })
    }

    /// Hands every message not acked back to the queue, in place, and
    /// returns once the queue shows them again.
    ///
    /// A quorum queue applies a requeue through its log, after the nack and
    /// even after the channel's close have been answered: without the wait,
    /// a `dlq show` run right after a `dlq list` could find the queue
    /// empty and say nothing is parked.
    async fn release(self, conn: &Connection) -> anyhow::Result<()> {
        let settled = self.messages.iter().filter(|m| m.settled).count();
        let last_unsettled = self.messages.iter().rev().find(|m| !m.settled);
        let result = match last_unsettled {
            Some(m) => m
                .delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: true,
                    requeue: true,
                })
                .await
                .map(|_| ())
                .with_context(|| {
                    format!(
                        "handing the messages back to {} (they return to it when this \
                         connection closes)",
                        self.service.parking_queue()
                    )
                }),
            None => Ok(()),
        };
        let released_some = last_unsettled.is_some();
        let _ = self.channel.close(200, "done".into()).await;
        if result.is_ok() && released_some {
            // Ready again: at least what was there, less what was acked
            // (new copies only add to it).
            let expected = (self.count as usize).saturating_sub(settled);
            wait_ready(conn, &self.service.parking_queue(), expected).await;
        }
        result
    }
}

/// Messages ready in `queue` (a passive declaration: it must exist).
async fn ready_count(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
}

/// Waits (a few seconds at most) until `queue` has `expected` messages
/// ready. Another reader holding some is why it would not: then it gives
/// up quietly, the broker hands them back when that reader is done.
async fn wait_ready(conn: &Connection, queue: &str, expected: usize) {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);
    let Ok(channel) = conn.create_channel().await else {
        return;
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match ready_count(&channel, queue).await {
            Ok(n) if (n as usize) < expected && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            _ => break,
        }
    }
    let _ = channel.close(200, "done".into()).await;
}

/// `dlq list`: per parking queue, its count and its messages.
pub async fn list(
    broker: &Broker,
    service: Option<&str>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let wanted = services(service)?;
    let conn = broker.connect().await?;
    let mut queues = Vec::new();
    let mut out = String::new();
    for svc in wanted {
        let snapshot = Snapshot::take(&conn, svc, Some(limit)).await?;
        let rows: Vec<Value> = snapshot.messages.iter().map(|m| m.summary(&svc)).collect();
        out.push_str(&format!(
            "{}: {} message{}",
            svc.parking_queue(),
            snapshot.count,
            if snapshot.count == 1 { "" } else { "s" }
        ));
        if (snapshot.messages.len() as u64) < u64::from(snapshot.count) {
            out.push_str(&format!(" (first {} shown)", snapshot.messages.len()));
        }
        out.push('\n');
        if !rows.is_empty() {
            let mut t = Table::new(&[
                "#",
                "message_id",
                "type",
                "routing key",
                "parked at",
                "reason",
            ]);
            for r in &rows {
                let g = |k: &str| text(r.get(k));
                t.row(vec![
                    g("position"),
                    g("message_id"),
                    g("type"),
                    g("routing_key"),
                    g("parked_at"),
                    cut(&g("reason"), 100),
                ]);
            }
            out.push_str(&t.render("  "));
            out.push('\n');
        }
        queues.push(json!({
            "service": svc.name,
            "queue": svc.parking_queue(),
            "count": snapshot.count,
            "messages": rows,
        }));
        snapshot.release(&conn).await?;
    }
    let _ = conn.close(200, "done".into()).await;
    if json {
        print_json(&json!({ "queues": queues }));
    } else {
        print!("{out}");
    }
    Ok(())
}

/// `dlq show ID`: every parked copy with that message id (or the `#N`-th
/// message), with its headers and body.
pub async fn show(
    broker: &Broker,
    selector: &str,
    service: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let wanted = services(service)?;
    if selector.starts_with('#') && wanted.len() != 1 {
        return Err(Failure::Usage(format!(
            "{selector} is a position in one queue: name it with --service"
        ))
        .into());
    }
    let conn = broker.connect().await?;
    let mut found = Vec::new();
    for svc in wanted {
        let snapshot = Snapshot::take(&conn, svc, None).await?;
        found.extend(
            snapshot
                .messages
                .iter()
                .filter(|m| m.matches(selector))
                .map(|m| m.detail(&svc)),
        );
        snapshot.release(&conn).await?;
    }
    let _ = conn.close(200, "done".into()).await;
    if found.is_empty() {
        return Err(Failure::NotFound(format!("no parked message {selector}")).into());
    }
    if json {
        print_json(&Value::Array(found));
        return Ok(());
    }
    for (i, m) in found.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!(
            "{} #{}  message_id {}",
            text(m.get("service")),
            text(m.get("position")),
            text(m.get("message_id"))
        );
        println!("  reason     {}", text(m.get("reason")));
        println!(
            "  parked at  {}   by {}",
            text(m.get("parked_at")),
            text(m.get("parked_by"))
        );
        println!(
            "  routing    {}   type {}",
            text(m.get("routing_key")),
            text(m.get("type"))
        );
        println!("  sender     {}", text(m.get("sender")));
        println!("  properties:");
        if let Some(Value::Object(p)) = m.get("properties") {
            for (k, v) in p.iter().filter(|(_, v)| !v.is_null()) {
                println!("    {k}: {}", text(Some(v)));
            }
        }
        println!("  headers:");
        if let Some(Value::Object(h)) = m.get("headers") {
            for (k, v) in h {
                println!("    {}: {}", clean(k), text(Some(v)));
            }
        }
        println!("  body:");
        let body = m.get("body").cloned().unwrap_or(Value::Null);
        let shown = match &body {
            Value::String(s) => clean(s),
            other => serde_json::to_string_pretty(other).unwrap_or_else(|_| other.to_string()),
        };
        for line in shown.lines() {
            println!("    {line}");
        }
    }
    Ok(())
}

/// Which parked messages to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    One(String),
}

/// How a parked message is published again.
#[derive(Debug)]
pub struct Plan {
    /// `saga.requeue` (straight to the work queue, by its name) or
    /// `saga.events`.
    pub exchange: String,
    pub routing_key: String,
    /// The `user_id` to stamp: the connection must log in as this user
    /// (RabbitMQ refuses any other).
    pub user: Option<String>,
    pub headers: FieldTable,
}

/// How to publish again a message parked at `service`, so that the service
/// takes it exactly as it would have taken the original — with the same
/// sender, never laundered through another user:
///
/// - sent by the service's own broker user (the shared-user set-up; its own
///   retries), or an `order.requested` (anyone may send one): straight to
///   its work queue, through `saga.requeue` by the queue's name, as the
///   service's own retries travel (`x-original-routing-key` says which
///   event it is) — or, for a client's `order.requested` the broker parked
///   itself, to `saga.events` again as that client;
/// - sent by another user (with a broker user per service, the owner of the
///   event): to `saga.events` with its own routing key, as that user — so
///   the connection must be that user's. Every service bound to the key sees
///   it again and recognises what it already applied.
pub fn plan_replay(
    service: &ServiceIdentity,
    delivered_with: &str,
    props: &BasicProperties,
) -> Result<Plan, String> {
    let headers = props.headers().clone().unwrap_or_default();
    let user_id = props.user_id().as_ref().map(ToString::to_string);
    let parked_by_service = headers.inner().contains_key(H_PARKED_BY);
    // The parking service stamps its own user on the copy, and keeps the
    // first sender in x-parked-sender; the broker's dead-lettering keeps
    // the message as it was.
    let (own_user, sender) = if parked_by_service {
        let sender = header(&headers, H_PARKED_SENDER).filter(|s| !s.is_empty());
        (user_id, sender)
    } else if headers.inner().contains_key(H_ORIGINAL_ROUTING_KEY) {
        // A retry copy the service re-published itself, as its own user.
        (user_id.clone(), user_id)
    } else {
        (None, user_id)
    };
    let key = original_routing_key(&headers, delivered_with).ok_or_else(|| {
        format!(
            "cannot tell which event it is (routing key {delivered_with:?}, no \
             {H_ORIGINAL_ROUTING_KEY}): not replayed"
        )
    })?;
    let Some(event) = EventType::from_routing_key(&key) else {
        return Err(format!("{key:?} is not an event type: not replayed"));
    };

    let mut fresh = without(&headers, &DROPPED_ON_REPLAY);
    let public_entry = trust::owner(event).is_none();
    let direct_user = if public_entry {
        own_user.clone().or_else(|| sender.clone())
    } else if own_user.is_some() && own_user == sender {
        own_user.clone()
    } else {
        None
    };
    if let Some(user) = direct_user {
        if own_user.as_ref() == Some(&user) {
            fresh.insert(H_ORIGINAL_ROUTING_KEY.into(), long_str(&key));
            fresh.insert(H_ORIGINAL_EXCHANGE.into(), long_str(EXCHANGE));
            return Ok(Plan {
                exchange: REQUEUE_EXCHANGE.to_owned(),
                routing_key: service.queue(),
                user: Some(user),
                headers: fresh,
            });
        }
        // A client's order, parked by the broker itself: placed again as
        // that client, through the exchange, by its routing key.
        return Ok(Plan {
            exchange: EXCHANGE.to_owned(),
            routing_key: key,
            user: Some(user),
            headers: without(&fresh, &CONTROL_HEADERS),
        });
    }
    let Some(sender) = sender else {
        return Err(format!(
            "it was published without a validated user id, so {} would refuse it again as \
             unauthenticated: not replayed",
            service.name
        ));
    };
    Ok(Plan {
        exchange: EXCHANGE.to_owned(),
        routing_key: key,
        user: Some(sender),
        // Only the consuming service's own user may carry these.
        headers: without(&fresh, &CONTROL_HEADERS),
    })
}

/// `table` without the headers named in `dropped`.
fn without(table: &FieldTable, dropped: &[&str]) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in table.inner() {
        if !dropped.contains(&k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The properties of the replayed copy: the original's (message id, type,
/// correlation id, reply-to, content type, persistence, timestamp), the
/// planned headers and user id; no expiration.
fn replay_properties(original: &BasicProperties, plan: &Plan) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_headers(plan.headers.clone())
        .with_delivery_mode(original.delivery_mode().unwrap_or(2));
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(user) = &plan.user {
        p = p.with_user_id(user.as_str().into());
    }
    p
}

/// `dlq replay`: publishes the selected parked messages again, each acked
/// off the parking queue once the broker confirmed its copy.
pub async fn replay(
    broker: &Broker,
    service: &str,
    which: &Selection,
    json: bool,
) -> anyhow::Result<()> {
    let svc = service_named(service)?;
    let conn = broker.connect().await?;
    let mut snapshot = Snapshot::take(&conn, svc, None).await?;
    let selected: Vec<usize> = (0..snapshot.messages.len())
        .filter(|&i| match which {
            Selection::All => true,
            Selection::One(sel) => snapshot.messages[i].matches(sel),
        })
        .collect();
    if selected.is_empty() {
        snapshot.release(&conn).await?;
        let _ = conn.close(200, "done".into()).await;
        return Err(match which {
            Selection::All => Failure::NotFound(format!("nothing is parked at {}", svc.name)),
            Selection::One(sel) => {
                Failure::NotFound(format!("no parked message {sel} at {}", svc.name))
            }
        }
        .into());
    }
    let outcome = replay_selected(broker, &conn, &mut snapshot, &selected).await;
    let released = snapshot.release(&conn).await;
    let _ = conn.close(200, "done".into()).await;
    let (done, skipped, error) = outcome;
    if json {
        print_json(&json!({
            "service": svc.name,
            "replayed": done,
            "skipped": skipped,
            "error": error.as_ref().map(|e| format!("{e:#}")),
        }));
    } else {
        for d in &done {
            println!(
                "replayed {} ({}) to {}",
                text(d.get("message_id")),
                text(d.get("routing_key")),
                text(d.get("to"))
            );
        }
        for s in &skipped {
            eprintln!(
                "sagactl: not replayed: {} ({}): {}",
                text(s.get("message_id")),
                text(s.get("routing_key")),
                text(s.get("why"))
            );
        }
    }
    if let Some(error) = error {
        return Err(error);
    }
    released?;
    if done.is_empty() {
        return Err(anyhow::anyhow!(
            "nothing replayed: {} message(s) could not be",
            skipped.len()
        ));
    }
    Ok(())
}

type ReplayOutcome = (Vec<Value>, Vec<Value>, Option<anyhow::Error>);

async fn replay_selected(
    broker: &Broker,
    conn: &Connection,
    snapshot: &mut Snapshot,
    selected: &[usize],
) -> ReplayOutcome {
    let svc = snapshot.service;
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    let publisher = match open_confirm_channel(conn).await {
        Ok(ch) => ch,
        Err(e) => return (done, skipped, Some(e)),
    };
    let my_user = broker.user();
    for &i in selected {
        let m = &mut snapshot.messages[i];
        let id = m.message_id();
        let key = m.original_routing_key();
        let skip = |why: String| json!({"message_id": id, "routing_key": key, "why": why});
        if m.redacted() {
            skipped.push(skip(
                "its card data was removed before it was parked, so it cannot be applied \
                 again: the customer must place the order again"
                    .to_owned(),
            ));
            continue;
        }
        let plan = match plan_replay(
            &svc,
            m.delivery.routing_key.as_str(),
            &m.delivery.properties,
        ) {
            Ok(plan) => plan,
            Err(why) => {
                skipped.push(skip(why));
                continue;
            }
        };
        if let Some(user) = &plan.user
            && *user != my_user
        {
            let error = Failure::Refused(format!(
                "message {} must be published again as broker user {user:?} (the user that \
                 first sent it; RabbitMQ only accepts a user_id equal to the connection's user, \
                 and the services trust an event only from its owner's user), but AMQP_URL \
                 logs in as {my_user:?}: run sagactl with AMQP_URL naming user {user:?} (the \
                 AMQP_URL of the service that uses it)",
                text(Some(&json!(id)))
            ));
            let _ = publisher.close(200, "done".into()).await;
            return (done, skipped, Some(error.into()));
        }
        let props = replay_properties(&m.delivery.properties, &plan);
        let to = if plan.exchange == REQUEUE_EXCHANGE {
            format!("{} (its work queue)", plan.routing_key)
        } else {
            format!("{} with routing key {}", plan.exchange, plan.routing_key)
        };
        if let Err(error) = publish_confirmed(&publisher, &plan, &m.delivery.data, props).await {
            let error = if protocol_code_in(&error) == Some(406)
                && format!("{error:#}").contains("user_id")
            {
                Failure::Refused(format!(
                    "the broker refused the user id {:?} for this connection ({error:#}): set \
                     AMQP_URL to that user's",
                    plan.user.clone().unwrap_or_default()
                ))
                .into()
            } else {
                error.context(format!("replaying {}", text(Some(&json!(id)))))
            };
            return (done, skipped, Some(error));
        }
        if let Err(error) = m
            .delivery
            .acker
            .ack(BasicAckOptions { multiple: false })
            .await
        {
            // The copy is published: the parked one comes back when the
            // channel closes, and replaying it again is harmless.
            return (
                done,
                skipped,
                Some(anyhow::anyhow!(
                    "replayed {}, but could not remove it from {}: {error} (replaying it again \
                     is harmless)",
                    text(Some(&json!(id))),
                    svc.parking_queue()
                )),
            );
        }
        m.settled = true;
        done.push(json!({"message_id": id, "routing_key": key, "to": to}));
    }
    let _ = publisher.close(200, "done".into()).await;
    (done, skipped, None)
}

async fn open_confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn
        .create_channel()
        .await
        .context("opening a broker channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(ch)
}

/// The broker reply code in an error chain.
fn protocol_code_in(e: &anyhow::Error) -> Option<u16> {
    e.chain()
        .find_map(|c| c.downcast_ref::<lapin::Error>())
        .and_then(protocol_code)
}

async fn publish_confirmed(
    channel: &Channel,
    plan: &Plan,
    body: &[u8],
    props: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = channel
        .basic_publish(
            plan.exchange.as_str().into(),
            plan.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(anyhow::anyhow!(
            "the broker could not route it ({} {}): no queue is bound",
            plan.exchange,
            plan.routing_key
        )),
        Confirmation::Nack(_) => Err(anyhow::anyhow!(
            "the broker refused it (the queue is full?); it stays parked"
        )),
        Confirmation::NotRequested => Err(anyhow::anyhow!("no publisher confirm")),
    }
}

/// `dlq purge`: deletes every message parked at a service, after the
/// operator typed the service's name (unless `--yes`).
pub async fn purge(broker: &Broker, service: &str, yes: bool, json: bool) -> anyhow::Result<()> {
    let svc = service_named(service)?;
    let queue = svc.parking_queue();
    let conn = broker.connect().await?;
    let channel = conn
        .create_channel()
        .await
        .context("opening a broker channel")?;
    let count = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("looking up {queue}: {e}"))?
        .message_count();
    if !yes {
        eprint!(
            "This deletes the {count} message(s) parked in {queue}, for good.\nType the service \
             name ({}) to confirm: ",
            svc.name
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .context("reading the confirmation")?;
        if answer.trim() != svc.name {
            let _ = conn.close(200, "done".into()).await;
            return Err(anyhow::anyhow!("not confirmed: nothing purged"));
        }
    }
    let purged = channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .with_context(|| format!("purging {queue}"))?;
    let _ = conn.close(200, "done".into()).await;
    if json {
        print_json(&json!({"service": svc.name, "queue": queue, "purged": purged}));
    } else {
        println!("purged {purged} message(s) from {queue}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::messaging::topology::{INVENTORY_SVC, ORDER_SVC};

    fn parked_props(user: &str, sender: &str, key: &str) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(H_PARKED_REASON.into(), long_str("no reservation"));
        h.insert(H_PARKED_BY.into(), long_str("inventory-svc"));
        h.insert(H_PARKED_SENDER.into(), long_str(sender));
        h.insert(H_ORIGINAL_ROUTING_KEY.into(), long_str(key));
        h.insert(H_DELIVERY_COUNT.into(), AMQPValue::LongLongInt(12));
        h.insert("traceparent".into(), long_str("00-abc"));
        BasicProperties::default()
            .with_message_id("m1".into())
            .with_user_id(user.into())
            .with_headers(h)
    }

    fn has(t: &FieldTable, k: &str) -> bool {
        t.inner().contains_key(k)
    }

    #[test]
    fn a_message_from_the_services_own_user_goes_back_to_the_work_queue() {
        let props = parked_props("guest", "guest", "order.confirmed");
        let plan = plan_replay(&INVENTORY_SVC, "inventory-svc.parking", &props).unwrap();
        assert_eq!(plan.exchange, REQUEUE_EXCHANGE);
        assert_eq!(plan.routing_key, "inventory-svc.events");
        assert_eq!(plan.user.as_deref(), Some("guest"));
        assert_eq!(
            header(&plan.headers, H_ORIGINAL_ROUTING_KEY).as_deref(),
            Some("order.confirmed")
        );
        for dropped in [
            H_PARKED_REASON,
            H_PARKED_BY,
            H_PARKED_SENDER,
            H_DELIVERY_COUNT,
        ] {
            assert!(!has(&plan.headers, dropped), "{dropped}");
        }
        assert!(has(&plan.headers, "traceparent"));
    }

    #[test]
    fn a_message_from_another_user_is_never_restamped_as_the_service() {
        // A broker user per service: order-svc's user sent order.confirmed;
        // inventory-svc parked it as its own user.
        let props = parked_props("inventory_svc", "order_svc", "order.confirmed");
        let plan = plan_replay(&INVENTORY_SVC, "inventory-svc.parking", &props).unwrap();
        assert_eq!(plan.exchange, EXCHANGE);
        assert_eq!(plan.routing_key, "order.confirmed");
        assert_eq!(plan.user.as_deref(), Some("order_svc"));
        for control in CONTROL_HEADERS {
            assert!(!has(&plan.headers, control), "{control}");
        }
        // A forged one (another user) likewise needs the forger's own login.
        let props = parked_props("guest", "mallory", "payment.completed");
        let plan = plan_replay(&INVENTORY_SVC, "inventory-svc.parking", &props).unwrap();
        assert_eq!(plan.user.as_deref(), Some("mallory"));
    }

    #[test]
    fn a_message_without_a_sender_or_an_event_type_is_not_replayed() {
        let props = parked_props("guest", "", "payment.completed");
        assert!(plan_replay(&INVENTORY_SVC, "inventory-svc.parking", &props).is_err());
        let props = parked_props("guest", "guest", "payment.exploded");
        assert!(plan_replay(&INVENTORY_SVC, "inventory-svc.parking", &props).is_err());
        // But anyone may send order.requested.
        let props = parked_props("guest", "", "order.requested");
        let plan = plan_replay(&ORDER_SVC, "order-svc.parking", &props).unwrap();
        assert_eq!(plan.routing_key, "order-svc.events");
        assert_eq!(plan.user.as_deref(), Some("guest"));
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("amqp://u:secret@host:5672/%2f"),
            "amqp://u:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
    }
}
