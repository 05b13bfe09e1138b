//! order-svc under every interleaving of what can reach it.
//!
//! A history is a few client requests — over AMQP (`order.requested` with
//! its `message_id`, sent again with more reply targets), or over HTTP
//! with or without an `Idempotency-Key`, placed alone or grouped, with the
//! answer to the group's COMMIT lost — and a script of the steps' outcomes
//! (`payment.failed`, `inventory.failed`, `notification.failed`,
//! `notification.sent`, `notification.deferred`, the waits
//! `payment.action_required` and `inventory.backordered`, the timeline's
//! `payment.refunded` and `inventory.released`), deadlines passing and the
//! timeout watcher, duplicates, batches cut every way, crashes before the
//! ack and lost COMMIT answers.
//!
//! What order-svc promises, checked after every step:
//! - one order per request: per idempotency key, and per keyless HTTP
//!   request however often it is placed again; one `order.created` each;
//! - a saga is decided once: at most one of `order.confirmed` and
//!   `order.failed` (`order.cancelled` only with a timeout's failure), and
//!   the order's status says the same; confirmed only after a
//!   `notification.sent` or `.deferred`;
//! - every reply target of a decided saga gets its result exactly once; a
//!   saga that goes pending tells every target it had then, once.
//! - no message is parked or escalated.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{Duration, Utc};
use common::messaging::envelope::SagaContext;
use common::messaging::events::{
    EventType, InventoryBackordered, NotificationSent, PaymentActionRequired, PaymentRefunded,
    StepFailed,
};
use common::messaging::publisher::Publisher;
use common::messaging::topology::ORDER_SVC;
use common::saga::card::CardSealer;
use order_svc::decisions::DecisionWaiters;
use order_svc::handlers::OrderHandler;
use order_svc::progress::Progress;
use order_svc::saga::{OrderSaga, PlaceRequest};
use order_svc::watcher::NextWake;
use proptest::prelude::*;
use saga_tests::Svc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{self, Fault, Lab, Player, ensure};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// `order.requested` over AMQP (its `message_id` the key).
    Amqp,
    /// `POST /orders` with an `Idempotency-Key`.
    HttpKeyed,
    /// `POST /orders` without one.
    HttpKeyless,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    PaymentFailed,
    InventoryFailed,
    NotificationFailed,
    Sent,
    Deferred,
    ActionRequired,
    Backordered,
    Refunded,
    Released,
}

#[derive(Debug, Clone)]
enum Step {
    /// The request is made (again: one more reply target, a client retry).
    Place {
        request: usize,
    },
    /// The HTTP requests not placed yet arrive together (one group).
    PlaceTogether {
        commit_lost: bool,
    },
    Outcome {
        request: usize,
        outcome: Outcome,
    },
    /// The order's deadline passes.
    Expire {
        request: usize,
    },
    /// The timeout watcher's pass.
    Watch,
    Resend {
        nth: usize,
    },
    Deliver {
        size: usize,
        fault: Fault,
    },
}

#[derive(Debug, Clone)]
struct History {
    entries: Vec<Entry>,
    steps: Vec<Step>,
}

fn history() -> impl Strategy<Value = History> {
    let entry = prop_oneof![
        Just(Entry::Amqp),
        Just(Entry::HttpKeyed),
        Just(Entry::HttpKeyless)
    ];
    let outcome = prop_oneof![
        1 => Just(Outcome::PaymentFailed),
        1 => Just(Outcome::InventoryFailed),
        1 => Just(Outcome::NotificationFailed),
        3 => Just(Outcome::Sent),
        1 => Just(Outcome::Deferred),
        2 => Just(Outcome::ActionRequired),
        2 => Just(Outcome::Backordered),
        1 => Just(Outcome::Refunded),
        1 => Just(Outcome::Released),
    ];
    let step = prop_oneof![
        3 => (0..3usize).prop_map(|request| Step::Place { request }),
        1 => any::<bool>().prop_map(|commit_lost| Step::PlaceTogether { commit_lost }),
        5 => (0..3usize, outcome).prop_map(|(request, outcome)| Step::Outcome { request, outcome }),
        1 => (0..3usize).prop_map(|request| Step::Expire { request }),
        1 => Just(Step::Watch),
        1 => (0..16usize).prop_map(|nth| Step::Resend { nth }),
        4 => (1..=6usize, harness::fault()).prop_map(|(size, fault)| Step::Deliver { size, fault }),
    ];
    (
        proptest::collection::vec(entry, 1..=3),
        proptest::collection::vec(step, 1..=28),
    )
        .prop_map(|(entries, steps)| History { entries, steps })
}

fn saga(pool: PgPool, publisher: Publisher) -> OrderSaga {
    OrderSaga {
        pool,
        sealer: CardSealer::new(None).expect("the development key"),
        deadline: std::time::Duration::from_secs(60),
        long_deadline: std::time::Duration::from_secs(600),
        waiters: Arc::new(DecisionWaiters::default()),
        progress: Arc::new(Progress::default()),
        publisher,
        replica_queue: "order-svc.replica.checker".into(),
        next_wake: Arc::new(NextWake::default()),
    }
}

async fn lab() -> Lab<OrderHandler> {
    let lab = Lab::new(
        ORDER_SVC,
        Svc::Order,
        &order_svc::MIGRATOR,
        |pool, publisher| OrderHandler {
            saga: Arc::new(saga(pool, publisher)),
        },
    )
    .await;
    let mut conn = lab.pool.acquire().await.expect("a connection");
    order_svc::db::put_price(&mut conn, "productA", 1500)
        .await
        .expect("a price");
    drop(conn);
    lab
}

#[tokio::test(flavor = "multi_thread")]
async fn order_keeps_its_promises_under_every_interleaving() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab().await;
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        harness::explore("order-svc", 96, history(), |h| {
            handle.block_on(async { Run::new(&lab, &h).await.play().await })
        });
    });
    lab.close().await;
}

/// Defect 2 of issue 23: the answer to a group's COMMIT lost after it took
/// effect, each request was placed again on its own, and a request without
/// an `Idempotency-Key` got a new order: two sagas, two charges. Its order
/// id is now fixed before the first attempt, so placed again it finds the
/// order it placed.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_keyless_order_is_placed_once_when_its_commit_answer_is_lost() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab().await;
    let history = History {
        entries: vec![Entry::HttpKeyless, Entry::HttpKeyless, Entry::HttpKeyed],
        steps: vec![Step::PlaceTogether { commit_lost: true }],
    };
    let run = Run::new(&lab, &history).await;
    let customers = run.customers.clone();
    if let Err(violation) = run.play().await {
        panic!("{violation}");
    }
    let orders: i64 = sqlx::query_scalar("select count(*) from orders where customer_id = any($1)")
        .bind(&customers)
        .fetch_one(&lab.pool)
        .await
        .unwrap();
    assert_eq!(orders, 3, "three requests, three orders");
    lab.close().await;
}

/// One client request of a history.
struct Request {
    entry: Entry,
    /// The order it placed, once known.
    order_id: Option<Uuid>,
    /// Its fixed id for a keyless HTTP request (placed again, it is the
    /// same request).
    placement_id: Uuid,
    /// AMQP reply targets sent so far.
    targets: usize,
    placed: bool,
}

struct Run<'a> {
    p: Player<'a, OrderHandler>,
    history: &'a History,
    saga: Arc<OrderSaga>,
    customers: Vec<String>,
    requests: Vec<Request>,
    tag: String,
    /// Reply targets (queue, correlation id) registered, each with how many
    /// events the outbox held when its `order.requested` was handled.
    registered: HashMap<(String, String), usize>,
    /// Acked deliveries learned from so far.
    learned: usize,
    /// Orders a `notification.sent` or `.deferred` was sent for.
    notified: HashSet<Uuid>,
}

impl<'a> Run<'a> {
    async fn new(lab: &'a Lab<OrderHandler>, history: &'a History) -> Run<'a> {
        let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
        Run {
            p: Player::new(lab, 0).await,
            history,
            saga: lab.judge.handler().saga.clone(),
            customers: (0..history.entries.len())
                .map(|n| format!("customer{n}-{tag}"))
                .collect(),
            requests: history
                .entries
                .iter()
                .map(|entry| Request {
                    entry: *entry,
                    order_id: None,
                    placement_id: Uuid::now_v7(),
                    targets: 0,
                    placed: false,
                })
                .collect(),
            tag,
            registered: HashMap::new(),
            learned: 0,
            notified: HashSet::new(),
        }
    }

    async fn play(mut self) -> Result<(), String> {
        for step in &self.history.steps {
            self.step(step).await?;
            self.learn().await?;
            self.check().await.map_err(|e| self.p.explain(e))?;
        }
        while self.p.deliver_rest().await {
            self.learn().await?;
            self.check().await.map_err(|e| self.p.explain(e))?;
        }
        self.p.finish().await
    }

    fn key(&self, request: usize) -> Option<String> {
        match self.requests[request].entry {
            Entry::Amqp => Some(format!("amqp-{request}-{}", self.tag)),
            Entry::HttpKeyed => Some(format!("http-{request}-{}", self.tag)),
            Entry::HttpKeyless => None,
        }
    }

    fn order_dict(&self, request: usize) -> serde_json::Value {
        serde_json::json!({
            "customer_id": self.customers[request],
            "items": [{"item_id": "productA", "quantity": 1}],
            "payment_info": {"card_number": "4242 4242 4242 4242", "expiry_date": "12/30", "cvv": "123"},
        })
    }

    fn place_request(&self, request: usize) -> PlaceRequest {
        let order = order_svc::domain::validate_order(&self.order_dict(request)).expect("valid");
        PlaceRequest {
            // A keyless request keeps its id when placed again; a keyed one
            // is a new HTTP request each time (its key finds the order).
            order_id: match self.requests[request].entry {
                Entry::HttpKeyless => self.requests[request].placement_id,
                _ => Uuid::now_v7(),
            },
            order,
            key: self.key(request),
            reply: None,
            wait: false,
        }
    }

    async fn place_over_http(&mut self, requests: &[usize], commit_lost: bool) {
        let placing: Vec<PlaceRequest> = requests.iter().map(|&r| self.place_request(r)).collect();
        if commit_lost {
            fail::cfg("unit_of_work::commit_lost", "1*return").expect("failpoint");
        }
        let outcomes = order_svc::placer::place_group(&self.saga, &placing).await;
        if commit_lost {
            fail::remove("unit_of_work::commit_lost");
        }
        let mut told = Vec::new();
        for (&r, outcome) in requests.iter().zip(outcomes) {
            self.requests[r].placed = true;
            match outcome {
                Ok(placement) => {
                    self.requests[r].order_id = Some(placement.order_id);
                    told.push(format!("#{r} → {}", placement.order_id));
                }
                Err(e) => told.push(format!("#{r} → {e}")),
            }
        }
        self.p.note(format!(
            "POST /orders{}: {}",
            if commit_lost {
                " (the group's COMMIT answer lost)"
            } else {
                ""
            },
            told.join(", ")
        ));
    }

    async fn step(&mut self, step: &Step) -> Result<(), String> {
        let n = self.requests.len();
        match *step {
            Step::Place { request } => {
                let r = request % n;
                match self.requests[r].entry {
                    Entry::Amqp => {
                        if self.requests[r].targets >= 3 {
                            return Ok(());
                        }
                        let target = self.requests[r].targets;
                        self.requests[r].targets += 1;
                        let key = self.key(r).expect("a key");
                        let body = serde_json::to_vec(&self.order_dict(r)).expect("json");
                        let mut incoming =
                            harness::incoming(&common::messaging::outbox::OutboxMessage {
                                id: Uuid::now_v7(),
                                exchange: "saga.events".into(),
                                routing_key: "order.requested".into(),
                                message_type: "order.requested".into(),
                                correlation_id: Some(format!("c{target}")),
                                body,
                                mandatory: true,
                                traceparent: None,
                            });
                        incoming.message_id = Some(key);
                        incoming.reply_to = Some(format!("amq.gen-replies-{r}-{}", self.tag));
                        self.requests[r].placed = true;
                        self.p
                            .note(format!("#{r}: order.requested with reply target {target}"));
                        self.p.send_incoming(incoming);
                    }
                    Entry::HttpKeyless if self.requests[r].placed => {}
                    _ => self.place_over_http(&[r], false).await,
                }
            }
            Step::PlaceTogether { commit_lost } => {
                let waiting: Vec<usize> = (0..n)
                    .filter(|&r| self.requests[r].entry != Entry::Amqp && !self.requests[r].placed)
                    .collect();
                if !waiting.is_empty() {
                    self.place_over_http(&waiting, commit_lost).await;
                }
            }
            Step::Outcome { request, outcome } => {
                let r = request % n;
                let Some(order_id) = self.requests[r].order_id else {
                    return Ok(());
                };
                let now = Utc::now();
                let ctx = |producer: &'static str, long: bool| SagaContext {
                    order_id,
                    deadline_at: now + Duration::seconds(if long { 600 } else { 60 }),
                    causation_id: format!("{producer}:{outcome:?}:{order_id}"),
                    producer,
                    trail: Vec::new(),
                };
                let failed = |code: &str| StepFailed {
                    code: code.into(),
                    reason: format!("{code} for the checker"),
                };
                let m = match outcome {
                    Outcome::PaymentFailed => ctx("payment-svc", false)
                        .event(EventType::PaymentFailed, &failed("card_declined")),
                    Outcome::InventoryFailed => ctx("inventory-svc", false)
                        .event(EventType::InventoryFailed, &failed("out_of_stock")),
                    Outcome::NotificationFailed => ctx("notification-svc", false)
                        .event(EventType::NotificationFailed, &failed("email_bounced")),
                    Outcome::Sent | Outcome::Deferred => {
                        self.notified.insert(order_id);
                        ctx("notification-svc", false).event(
                            if matches!(outcome, Outcome::Sent) {
                                EventType::NotificationSent
                            } else {
                                EventType::NotificationDeferred
                            },
                            &NotificationSent {
                                email_id: Uuid::now_v7(),
                                kind: "confirmation".into(),
                            },
                        )
                    }
                    Outcome::ActionRequired => ctx("payment-svc", true).event(
                        EventType::PaymentActionRequired,
                        &PaymentActionRequired {
                            customer_id: self.customers[r].clone(),
                            items: Vec::new(),
                            amount_cents: 1500,
                            currency: "USD".into(),
                            card_last4: "3220".into(),
                            action: "3ds_confirmation".into(),
                        },
                    ),
                    Outcome::Backordered => ctx("inventory-svc", true).event(
                        EventType::InventoryBackordered,
                        &InventoryBackordered {
                            customer_id: self.customers[r].clone(),
                            backordered: vec!["productA".into()],
                        },
                    ),
                    Outcome::Refunded => ctx("payment-svc", false).event(
                        EventType::PaymentRefunded,
                        &PaymentRefunded {
                            customer_id: self.customers[r].clone(),
                            amount_cents: 1500,
                        },
                    ),
                    Outcome::Released => ctx("inventory-svc", false).event(
                        EventType::InventoryReleased,
                        &common::messaging::events::InventoryReleased { items: Vec::new() },
                    ),
                };
                self.p.send(&m);
            }
            Step::Expire { request } => {
                let r = request % n;
                if let Some(order_id) = self.requests[r].order_id {
                    sqlx::query(
                        "update orders set deadline_at = now() - interval '1 ms' \
                         where order_id = $1 and status = 'PENDING'",
                    )
                    .bind(order_id)
                    .execute(&self.p.lab.pool)
                    .await
                    .map_err(|e| e.to_string())?;
                    self.p.note(format!("#{r}: its deadline passes"));
                }
            }
            Step::Watch => {
                let failed = self
                    .saga
                    .fail_overdue(100)
                    .await
                    .map_err(|e| e.to_string())?;
                self.p.note(format!("the timeout watcher fails {failed}"));
            }
            Step::Resend { nth } => self.p.resend(nth),
            Step::Deliver { size, fault } => {
                self.p.deliver(size, fault).await;
            }
        }
        Ok(())
    }

    /// What the acked deliveries established: reply targets registered,
    /// orders notified; and the orders of AMQP requests, once order-svc
    /// created them.
    async fn learn(&mut self) -> Result<(), String> {
        for (message, committed) in &self.p.acked_log[self.learned..] {
            if message.routing_key == "order.requested"
                && let (Some(to), Some(corr)) = (&message.reply_to, &message.correlation_id)
            {
                self.registered
                    .entry((to.clone(), corr.clone()))
                    .or_insert(*committed);
            }
        }
        self.learned = self.p.acked_log.len();
        for r in 0..self.requests.len() {
            if self.requests[r].order_id.is_some() || self.requests[r].entry != Entry::Amqp {
                continue;
            }
            let key = self.key(r);
            let id: Option<Uuid> =
                sqlx::query_scalar("select order_id from orders where idempotency_key = $1")
                    .bind(key)
                    .fetch_optional(&self.p.lab.pool)
                    .await
                    .map_err(|e| e.to_string())?;
            if let Some(id) = id {
                self.requests[r].order_id = Some(id);
                self.p.orders.push(id);
            }
        }
        for r in &self.requests {
            if let Some(id) = r.order_id
                && !self.p.orders.contains(&id)
            {
                self.p.orders.push(id);
            }
        }
        Ok(())
    }

    async fn check(&self) -> Result<(), String> {
        let pool = &self.p.lab.pool;
        let per_customer: Vec<(String, i64)> = sqlx::query_as(
            "select customer_id, count(*) from orders where customer_id = any($1) group by 1",
        )
        .bind(&self.customers)
        .fetch_all(pool)
        .await
        .map_err(|e| e.to_string())?;
        for (customer, n) in per_customer {
            ensure(n == 1, || format!("{customer}: {n} orders for one request"))?;
        }
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("select order_id, status from orders where customer_id = any($1)")
                .bind(&self.customers)
                .fetch_all(pool)
                .await
                .map_err(|e| e.to_string())?;
        let outbox = self.p.outbox().await;
        for (id, status) in &rows {
            let count = |key| Player::<OrderHandler>::count(&outbox, *id, key);
            let (created, confirmed, failed, cancelled) = (
                count("order.created"),
                count("order.confirmed"),
                count("order.failed"),
                count("order.cancelled"),
            );
            ensure(created == 1, || format!("{id}: {created} order.created"))?;
            ensure(confirmed + failed <= 1 && cancelled <= failed, || {
                format!(
                    "{id}: decided {confirmed} confirmed, {failed} failed, {cancelled} cancelled"
                )
            })?;
            let expected = if confirmed == 1 {
                "CONFIRMED"
            } else if failed == 1 {
                "FAILED"
            } else {
                "PENDING"
            };
            ensure(status == expected, || {
                format!("{id}: status {status}, yet its events say {expected}")
            })?;
            if confirmed == 1 {
                ensure(self.notified.contains(id), || {
                    format!("{id}: confirmed with no notification.sent or .deferred sent")
                })?;
            }
        }
        // Replies, per target registered.
        for ((to, corr), at) in &self.registered {
            let replies: Vec<(usize, &harness::Committed)> = outbox
                .iter()
                .enumerate()
                .filter(|(_, e)| &e.routing_key == to && e.correlation_id.as_deref() == Some(corr))
                .collect();
            let finals = replies
                .iter()
                .filter(|(_, e)| matches!(e.status.as_deref(), Some("success" | "failure")))
                .count();
            let Some(order_id) = replies.iter().find_map(|(_, e)| e.order_id).or_else(|| {
                let r: usize = to.split('-').nth(1)?.parse().ok()?;
                self.requests.get(r)?.order_id
            }) else {
                continue;
            };
            let decided = Player::<OrderHandler>::count(&outbox, order_id, "order.confirmed")
                + Player::<OrderHandler>::count(&outbox, order_id, "order.failed");
            ensure(finals == decided, || {
                format!("{to}/{corr}: {finals} final replies, for a saga decided {decided} times")
            })?;
            // Pending: told once, if the saga went pending after the target
            // was registered.
            let pending_after: bool = outbox[(*at).min(outbox.len())..].iter().any(|e| {
                e.order_id == Some(order_id)
                    && e.status.as_deref() == Some("pending")
                    && e.routing_key.starts_with("replies-")
            });
            let told = replies
                .iter()
                .filter(|(_, e)| e.status.as_deref() == Some("pending"))
                .count();
            ensure(told <= 2, || {
                format!("{to}/{corr}: told pending {told} times")
            })?;
            if pending_after {
                ensure(told >= 1, || {
                    format!(
                        "{to}/{corr}: the saga went pending after it was registered; it was not told"
                    )
                })?;
            }
        }
        Ok(())
    }
}

/// Two of issue 23's smaller defects in order-svc, as fixed histories: a
/// saga that went pending told only its first reply target (the checker
/// found it on its own on the old code), and a late copy of
/// `payment.action_required` took a saga waiting for its items back to
/// waiting for its payment.
#[tokio::test(flavor = "multi_thread")]
async fn regression_pending_is_told_to_every_target_and_never_goes_back() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab().await;
    let deliver = Step::Deliver {
        size: 4,
        fault: Fault::None,
    };
    let history = History {
        entries: vec![Entry::Amqp],
        steps: vec![
            Step::Place { request: 0 },
            Step::Place { request: 0 },
            deliver.clone(),
            Step::Outcome {
                request: 0,
                outcome: Outcome::ActionRequired,
            },
            deliver.clone(),
            Step::Outcome {
                request: 0,
                outcome: Outcome::Backordered,
            },
            deliver.clone(),
            // The first wait's event, again.
            Step::Resend { nth: 2 },
            deliver,
        ],
    };
    let run = Run::new(&lab, &history).await;
    let key = run.key(0);
    if let Err(violation) = run.play().await {
        panic!("{violation}");
    }
    let awaiting: Option<String> =
        sqlx::query_scalar("select awaiting from orders where idempotency_key = $1")
            .bind(key)
            .fetch_one(&lab.pool)
            .await
            .unwrap();
    assert_eq!(awaiting.as_deref(), Some("stock_arrival"));
    lab.close().await;
}

/// Two of issue 23's smaller defects: the reconciler took a saga up once it
/// was *created* long enough ago, so one decided late was flagged while its
/// compensations were on their way; and resolved findings and escalations
/// were kept forever. A saga is now checked once it was *decided* long
/// enough ago, and both tables keep what is resolved for the retention
/// window only.
#[tokio::test(flavor = "multi_thread")]
async fn regression_the_reconciler_waits_for_the_decision_and_old_resolutions_go() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab().await;
    let mut conn = lab.pool.acquire().await.unwrap();
    sqlx::query("delete from reconciler_progress")
        .execute(&mut *conn)
        .await
        .unwrap();
    let history = History {
        entries: vec![Entry::HttpKeyless, Entry::HttpKeyless],
        steps: vec![Step::PlaceTogether { commit_lost: false }],
    };
    let mut run = Run::new(&lab, &history).await;
    run.step(&history.steps[0]).await.unwrap();
    let (early, late) = (
        run.requests[0].order_id.unwrap(),
        run.requests[1].order_id.unwrap(),
    );
    // Both created a minute ago; one decided a minute ago, one just now.
    sqlx::query(
        "update orders set created_at = now() - interval '60 s', status = 'FAILED', \
         decided_at = case when order_id = $1 then now() - interval '59 s' else now() end \
         where order_id = any($2)",
    )
    .bind(early)
    .bind([early, late])
    .execute(&mut *conn)
    .await
    .unwrap();
    let batch =
        order_svc::db::sagas_to_reconcile(&mut conn, std::time::Duration::from_secs(10), 100)
            .await
            .unwrap();
    let ids: Vec<Uuid> = batch.sagas.iter().map(|(id, _)| *id).collect();
    assert!(ids.contains(&early), "{ids:?}");
    assert!(
        !ids.contains(&late),
        "a saga decided just now is not checked yet: {ids:?}"
    );

    // Resolved findings and escalations outlive the window no longer.
    sqlx::query(
        "insert into saga_findings (order_id, kind, detail, resolved_at) values \
         ($1, 'old', 'resolved long ago', now() - interval '2 hours'), \
         ($1, 'open', 'still open', null)",
    )
    .bind(early)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "insert into escalations (id, message_id, order_id, step, routing_key, body, attempts, \
         last_error, status, resolved_at) values \
         ($1, $1, $3, 'refund', 'order.failed', '', 1, 'x', 'resolved', now() - interval '2 hours'), \
         ($2, $2, $3, 'refund', 'order.failed', '', 1, 'x', 'open', null)",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .bind(early)
    .execute(&mut *conn)
    .await
    .unwrap();
    let window = std::time::Duration::from_secs(3600);
    order_svc::db::prune_findings(&mut conn, window)
        .await
        .unwrap();
    common::store::retention::clean_once(&lab.pool, window)
        .await
        .unwrap();
    let findings: Vec<String> =
        sqlx::query_scalar("select kind from saga_findings where order_id = $1")
            .bind(early)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(findings, vec!["open".to_owned()]);
    let escalations: Vec<String> =
        sqlx::query_scalar("select status from escalations where order_id = $1")
            .bind(early)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(escalations, vec!["open".to_owned()]);
    drop(conn);
    lab.close().await;
}
