//! notification-svc under every interleaving of what can reach it, with an
//! external mail relay whose behaviour the history scripts.
//!
//! A history is a few orders — their customer's address deliverable or
//! not, their deadline already past or not — and a script:
//! `inventory.reserved`, the saga's rollback at any moment, duplicates,
//! batches cut every way (a crash before the commit, after the relay took
//! the emails; a crash before the ack; a lost COMMIT answer), the relay up,
//! down, hanging (it may have taken what it was sent) or refusing, passes
//! of the queued sender (one may crash between the relay's answer and its
//! record), and time passing (leases and back-offs run out).
//!
//! What notification-svc promises, checked after every step and at the end
//! (the relay up, the queue emptied):
//! - never a confirmation alone for a failed order: once the rollback of
//!   an order is handled, every confirmation the relay took is followed by
//!   a cancellation (the relay's log is the truth);
//! - per order, at most one of `notification.sent`, `.failed`,
//!   `.deferred`, and none once its rollback is handled;
//! - a queued confirmation of an order not rolled back goes out once the
//!   relay is back; nothing stays queued;
//! - no message is parked or escalated.

use std::sync::{Arc, Mutex};

use chrono::{Duration, Utc};
use common::messaging::envelope::SagaContext;
use common::messaging::events::{EventType, InventoryReserved};
use common::messaging::topology::NOTIFICATION_SVC;
use common::saga::order::OrderLine;
use futures_util::future::BoxFuture;
use notification_svc::domain::{Email, EmailKind};
use notification_svc::handlers::NotificationHandler;
use notification_svc::queue::RelayHealth;
use notification_svc::transport::{EmailTransport, SendError};
use proptest::prelude::*;
use saga_tests::Svc;
use uuid::Uuid;

use crate::harness::{self, Fault, Lab, Player, ensure};
use crate::inventory::decision;

/// What the scripted relay does with what it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    Up,
    /// Refuses connections: takes nothing.
    Down,
    /// Takes the email, and the exchange breaks off before its last answer.
    Hangs,
    /// Refuses every recipient for good.
    Rejects,
    /// Holds each confirmation until the test releases it (then takes it);
    /// takes everything else at once.
    HoldsConfirmations,
}

/// A mail relay whose behaviour the test sets, and the log of what it took.
pub struct ScriptedRelay {
    pub state: Mutex<Relay>,
    /// (order, kind) of every email it took, in order.
    pub took: Mutex<Vec<(Uuid, EmailKind)>>,
    /// (order, kind) of every email it refused for good.
    pub refused: Mutex<Vec<(Uuid, EmailKind)>>,
    /// How long a hanging relay keeps the sender waiting.
    pub hang_for: std::time::Duration,
    /// A confirmation is being held ([`Relay::HoldsConfirmations`]).
    pub holding: tokio::sync::Notify,
    /// Lets a held confirmation through.
    pub release: tokio::sync::Notify,
}

impl ScriptedRelay {
    pub fn new(hang_for: std::time::Duration) -> ScriptedRelay {
        ScriptedRelay {
            state: Mutex::new(Relay::Up),
            took: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
            hang_for,
            holding: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        }
    }

    pub fn set(&self, state: Relay) {
        *self.state.lock().unwrap() = state;
    }

    pub fn took(&self, order_id: Uuid) -> Vec<EmailKind> {
        self.took
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| *o == order_id)
            .map(|(_, k)| *k)
            .collect()
    }
}

impl EmailTransport for ScriptedRelay {
    fn name(&self) -> &'static str {
        "scripted-relay"
    }

    fn is_external(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, email: &'a Email) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let state = *self.state.lock().unwrap();
            match state {
                Relay::Up => {
                    self.took.lock().unwrap().push((email.order_id, email.kind));
                    Ok(())
                }
                Relay::Down => Err(SendError::Unavailable("connection refused".into())),
                Relay::Hangs => {
                    self.took.lock().unwrap().push((email.order_id, email.kind));
                    tokio::time::sleep(self.hang_for).await;
                    Err(SendError::Uncertain("timed out after DATA".into()))
                }
                Relay::HoldsConfirmations => {
                    if email.kind == EmailKind::Confirmation {
                        self.holding.notify_one();
                        self.release.notified().await;
                    }
                    self.took.lock().unwrap().push((email.order_id, email.kind));
                    Ok(())
                }
                Relay::Rejects => {
                    self.refused
                        .lock()
                        .unwrap()
                        .push((email.order_id, email.kind));
                    Err(SendError::Rejected("550 no such user".into()))
                }
            }
        })
    }
}

pub struct NotificationLab {
    pub lab: Lab<NotificationHandler>,
    pub relay: Arc<ScriptedRelay>,
    pub health: Arc<RelayHealth>,
}

pub async fn lab(hang_for: std::time::Duration) -> NotificationLab {
    let relay = Arc::new(ScriptedRelay::new(hang_for));
    let health = Arc::new(RelayHealth::default());
    let (r, h) = (relay.clone(), health.clone());
    let lab = Lab::new(
        NOTIFICATION_SVC,
        Svc::Notification,
        &notification_svc::MIGRATOR,
        move |pool, _| NotificationHandler {
            pool,
            transport: r,
            default_email_domain: "example.com".into(),
            relay: h,
        },
    )
    .await;
    NotificationLab { lab, relay, health }
}

#[derive(Debug, Clone)]
struct OrderSpec {
    /// The customer's address is on the `.invalid` domain.
    bounces: bool,
    /// Its `inventory.reserved` arrives with its deadline already past.
    expired: bool,
}

#[derive(Debug, Clone)]
enum Step {
    Reserved {
        order: usize,
    },
    Rollback {
        order: usize,
        timeout: bool,
    },
    Resend {
        nth: usize,
    },
    Deliver {
        size: usize,
        fault: Fault,
    },
    Relay(Relay),
    /// A pass of the queued sender; it may crash after the relay's answer.
    Queue {
        crash: bool,
    },
    /// Leases and back-offs run out.
    TimePasses,
}

#[derive(Debug, Clone)]
struct History {
    orders: Vec<OrderSpec>,
    steps: Vec<Step>,
}

fn history() -> impl Strategy<Value = History> {
    let order = (
        proptest::bool::weighted(0.15),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(bounces, expired)| OrderSpec { bounces, expired });
    let relay = prop_oneof![
        3 => Just(Relay::Up),
        2 => Just(Relay::Down),
        1 => Just(Relay::Hangs),
        1 => Just(Relay::Rejects),
    ];
    let step = prop_oneof![
        4 => (0..3usize).prop_map(|order| Step::Reserved { order }),
        3 => (0..3usize, any::<bool>()).prop_map(|(order, timeout)| Step::Rollback { order, timeout }),
        1 => (0..16usize).prop_map(|nth| Step::Resend { nth }),
        5 => (1..=6usize, harness::fault(), proptest::bool::weighted(0.1)).prop_map(
            |(size, fault, crash)| Step::Deliver {
                size,
                fault: if crash { Fault::CrashBeforeCommit } else { fault },
            }
        ),
        2 => relay.prop_map(Step::Relay),
        2 => proptest::bool::weighted(0.25).prop_map(|crash| Step::Queue { crash }),
        1 => Just(Step::TimePasses),
    ];
    (
        proptest::collection::vec(order, 1..=3),
        proptest::collection::vec(step, 1..=28),
    )
        .prop_map(|(orders, steps)| History { orders, steps })
}

#[tokio::test(flavor = "multi_thread")]
async fn notification_keeps_its_promises_under_every_interleaving() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab(std::time::Duration::ZERO).await;
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        harness::explore("notification-svc", 96, history(), |h| {
            handle.block_on(async { Run::new(&lab, &h).await.play().await })
        });
    });
    lab.lab.close().await;
}

struct Run<'a> {
    p: Player<'a, NotificationHandler>,
    lab: &'a NotificationLab,
    history: &'a History,
    customers: Vec<String>,
}

impl<'a> Run<'a> {
    async fn new(lab: &'a NotificationLab, history: &'a History) -> Run<'a> {
        let tag = &Uuid::new_v4().simple().to_string()[..8];
        lab.relay.set(Relay::Up);
        lab.health.mark_up();
        Run {
            p: Player::new(&lab.lab, history.orders.len()).await,
            lab,
            history,
            customers: (0..history.orders.len())
                .map(|n| format!("customer{n}-{tag}"))
                .collect(),
        }
    }

    async fn play(mut self) -> Result<(), String> {
        let pool = &self.lab.lab.pool;
        for (customer, spec) in self.customers.iter().zip(&self.history.orders) {
            if spec.bounces {
                let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
                notification_svc::db::put_customer_email(
                    &mut conn,
                    customer,
                    &format!("{customer}@mail.invalid"),
                )
                .await
                .map_err(|e| e.to_string())?;
            }
        }
        for step in &self.history.steps {
            self.step(step).await?;
            self.check(false).await.map_err(|e| self.p.explain(e))?;
        }
        // The relay comes back; everything is delivered; time passes.
        self.step(&Step::Relay(Relay::Up)).await?;
        for _ in 0..50 {
            while self.p.deliver_rest().await {
                self.check(false).await.map_err(|e| self.p.explain(e))?;
            }
            self.step(&Step::TimePasses).await?;
            self.step(&Step::Queue { crash: false }).await?;
            if self.p.queue.is_empty() && self.queued().await? == 0 {
                break;
            }
        }
        self.check(true).await.map_err(|e| self.p.explain(e))?;
        self.p.finish().await
    }

    fn context(&self, order: usize, cause: &str) -> SagaContext {
        harness::context(
            self.p.orders[order],
            self.history.orders[order].expired,
            cause,
        )
    }

    async fn queued(&self) -> Result<i64, String> {
        sqlx::query_scalar("select count(*) from deferred_emails where order_id = any($1)")
            .bind(&self.p.orders)
            .fetch_one(&self.lab.lab.pool)
            .await
            .map_err(|e| e.to_string())
    }

    async fn step(&mut self, step: &Step) -> Result<(), String> {
        let n = self.p.orders.len();
        match *step {
            Step::Reserved { order } => {
                let order = order % n;
                let m = self.context(order, "reserved").event(
                    EventType::InventoryReserved,
                    &InventoryReserved {
                        customer_id: self.customers[order].clone(),
                        items: vec![OrderLine {
                            item_id: "productA".into(),
                            quantity: 1,
                            unit_price_cents: 1500,
                        }],
                        amount_cents: 1500,
                        currency: "USD".into(),
                    },
                );
                self.p.send(&m);
            }
            Step::Rollback { order, timeout } => {
                let order = order % n;
                let mut ctx = self.context(order, "decision");
                ctx.deadline_at = Utc::now() + Duration::seconds(60);
                for m in decision(&ctx, 1500, false, timeout) {
                    self.p.send(&m);
                }
            }
            Step::Resend { nth } => self.p.resend(nth),
            Step::Deliver { size, fault } => {
                self.p.deliver(size, fault).await;
            }
            Step::Relay(state) => {
                self.lab.relay.set(state);
                self.p.note(format!("the relay is now {state:?}"));
            }
            Step::Queue { crash } => {
                let pool = &self.lab.lab.pool;
                let relay: &dyn EmailTransport = self.lab.relay.as_ref();
                if crash {
                    fail::cfg("notification::queue_after_send", "return").expect("failpoint");
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(300),
                        notification_svc::queue::send_due(pool, relay, &self.lab.health),
                    )
                    .await;
                    fail::remove("notification::queue_after_send");
                    self.p
                        .note("the queued sender crashes after the relay's answer".into());
                } else {
                    let sent = notification_svc::queue::send_due(pool, relay, &self.lab.health)
                        .await
                        .map_err(|e| e.to_string())?;
                    self.p.note(format!("the queued sender sends {sent}"));
                }
            }
            Step::TimePasses => {
                sqlx::query(
                    "update deferred_emails set next_attempt_at = now() - interval '1 ms', \
                     in_flight_until = null where order_id = any($1)",
                )
                .bind(&self.p.orders)
                .execute(&self.lab.lab.pool)
                .await
                .map_err(|e| e.to_string())?;
                self.lab.health.mark_up();
                self.p.note("time passes".into());
            }
        }
        Ok(())
    }

    async fn check(&self, at_the_end: bool) -> Result<(), String> {
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("select order_id, status from notifications where order_id = any($1)")
                .bind(&self.p.orders)
                .fetch_all(&self.lab.lab.pool)
                .await
                .map_err(|e| e.to_string())?;
        let status: std::collections::HashMap<Uuid, String> = rows.into_iter().collect();
        let outbox = self.p.outbox().await;
        for (n, id) in self.p.orders.iter().enumerate() {
            let count = |key| Player::<NotificationHandler>::count(&outbox, *id, key);
            let outcomes = count("notification.sent")
                + count("notification.failed")
                + count("notification.deferred");
            ensure(outcomes <= 1, || {
                format!("#{n}: {outcomes} outcomes (notification.sent/failed/deferred)")
            })?;
            let took = self.lab.relay.took(*id);
            let current = status.get(id).map(String::as_str);
            // The deadline rule: no confirmation after the deadline its
            // event carries.
            if self.history.orders[n].expired {
                ensure(!took.contains(&EmailKind::Confirmation), || {
                    format!(
                        "#{n}: inventory.reserved was past its deadline, yet the relay got a confirmation"
                    )
                })?;
            }
            if self.p.rolled_back.contains_key(id) {
                for key in ["notification.sent", "notification.deferred"] {
                    ensure(!self.p.after_rollback(&outbox, *id, key), || {
                        format!("#{n}: {key} after its rollback was handled")
                    })?;
                }
                ensure(
                    !matches!(current, Some("sent" | "sending" | "deferred")),
                    || {
                        format!(
                            "#{n}: its rollback was handled, yet its notification is {current:?}"
                        )
                    },
                )?;
                // A cancellation the relay refused for good was sent all the
                // same (and logged for an operator): the relay will take
                // nothing more for that address.
                let refused_cancellation = self
                    .lab
                    .relay
                    .refused
                    .lock()
                    .unwrap()
                    .contains(&(*id, EmailKind::Cancellation));
                if at_the_end && took.contains(&EmailKind::Confirmation) && !refused_cancellation {
                    let first = took.iter().position(|k| *k == EmailKind::Confirmation);
                    let last_cancellation =
                        took.iter().rposition(|k| *k == EmailKind::Cancellation);
                    ensure(last_cancellation > first, || {
                        format!(
                            "#{n}: the relay took a confirmation and no cancellation after it, \
                             for an order rolled back (relay log {took:?}, notification {current:?})"
                        )
                    })?;
                }
            } else if at_the_end && current == Some("deferred") {
                return Err(format!(
                    "#{n}: still deferred with the relay up and time passed"
                ));
            }
        }
        if at_the_end {
            let queued = self.queued().await?;
            ensure(queued == 0, || {
                format!("{queued} emails still queued at the end")
            })?;
        }
        Ok(())
    }
}

/// Defect 3 of issue 23: a confirmation the relay may have taken, then a
/// status that no longer says so — queued (`deferred`) after a resumed send
/// found the relay down or hanging, `bounced` after a resumed send the
/// relay refused, or still `deferred` after the queued sender crashed
/// between the relay's answer and its record — and a rollback that read
/// the status sent no cancellation. The checker found the first of these
/// on its own. Each history here ends with the rollback handled and the
/// relay up; the checker's model then wants a cancellation after the
/// confirmation in the relay's log.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_confirmation_the_relay_may_have_taken_is_always_cancelled() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab(std::time::Duration::ZERO).await;
    let plain = OrderSpec {
        bounces: false,
        expired: false,
    };
    let deliver = |fault| Step::Deliver { size: 1, fault };
    let reserved = Step::Reserved { order: 0 };
    let rollback = Step::Rollback {
        order: 0,
        timeout: false,
    };
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "the relay hangs after taking it: queued",
            vec![
                Step::Relay(Relay::Hangs),
                reserved.clone(),
                deliver(Fault::None),
            ],
        ),
        (
            "a crash after the relay took it; resumed with the relay down: queued",
            vec![
                reserved.clone(),
                deliver(Fault::CrashBeforeCommit),
                Step::Relay(Relay::Down),
                deliver(Fault::None),
            ],
        ),
        (
            "a crash after the relay took it; resumed and refused: bounced",
            vec![
                reserved.clone(),
                deliver(Fault::CrashBeforeCommit),
                Step::Relay(Relay::Rejects),
                deliver(Fault::None),
            ],
        ),
        (
            "queued; the queued sender crashes after the relay took it",
            vec![
                Step::Relay(Relay::Down),
                reserved.clone(),
                deliver(Fault::None),
                Step::Relay(Relay::Up),
                Step::TimePasses,
                Step::Queue { crash: true },
            ],
        ),
    ];
    for (what, steps) in cases {
        let history = History {
            orders: vec![plain.clone()],
            steps: steps
                .into_iter()
                .chain([
                    Step::Relay(Relay::Up),
                    rollback.clone(),
                    deliver(Fault::None),
                ])
                .collect(),
        };
        let run = Run::new(&lab, &history).await;
        let id = run.p.orders[0];
        if let Err(violation) = run.play().await {
            panic!("{what}:\n{violation}");
        }
        let took = lab.relay.took(id);
        assert!(
            took.first() == Some(&EmailKind::Confirmation)
                && took.last() == Some(&EmailKind::Cancellation),
            "{what}: the relay took {took:?}"
        );
    }
    lab.lab.close().await;
}

/// Defect 5 of issue 23: each rollback sent its cancellation inside the
/// batch's transaction, up to the relay's timeout each: with the relay
/// hanging, twenty rollbacks of confirmed orders outlasted the handler's
/// timeout, the batch was abandoned and handled again one by one. A
/// rollback now only queues the cancellation (one statement for the
/// batch), and the queued sender delivers it once the relay answers.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_hanging_relay_holds_no_rollback_hostage() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab(std::time::Duration::from_secs(2)).await;
    let history = History {
        orders: vec![
            OrderSpec {
                bounces: false,
                expired: false,
            };
            20
        ],
        steps: Vec::new(),
    };
    let mut run = Run::new(&lab, &history).await;
    for order in 0..20 {
        run.step(&Step::Reserved { order }).await.unwrap();
    }
    let sent = run.p.deliver(20, Fault::None).await;
    assert!(
        sent.iter()
            .all(|o| matches!(o.verdict, common::messaging::judge::Verdict::Ack))
    );
    lab.relay.set(Relay::Hangs);
    for order in 0..20 {
        run.step(&Step::Rollback {
            order,
            timeout: false,
        })
        .await
        .unwrap();
    }
    let started = std::time::Instant::now();
    let rolled_back = run.p.deliver(20, Fault::None).await;
    let took = started.elapsed();
    assert!(
        rolled_back
            .iter()
            .all(|o| matches!(o.verdict, common::messaging::judge::Verdict::Ack)),
        "{:?}",
        rolled_back.iter().map(|o| &o.verdict).collect::<Vec<_>>()
    );
    assert!(
        took < std::time::Duration::from_secs(1),
        "twenty rollbacks took {took:?} with the relay hanging"
    );
    // The relay answers again: every cancellation goes out, after its
    // confirmation.
    lab.relay.set(Relay::Up);
    lab.health.mark_up();
    let relay: &dyn EmailTransport = lab.relay.as_ref();
    notification_svc::queue::send_due(&lab.lab.pool, relay, &lab.health)
        .await
        .unwrap();
    for id in &run.p.orders {
        assert_eq!(
            lab.relay.took(*id),
            vec![EmailKind::Confirmation, EmailKind::Cancellation]
        );
    }
    lab.lab.close().await;
}

/// Found by the chaos test's relay that hangs after taking an email: the
/// SMTP client bounds only its connection, so a relay that never answered
/// after DATA held a batch (and the queued sender) for as long as it kept
/// the connection open; notification-svc stalled. A whole exchange is now
/// bounded, and what times out counts as possibly delivered.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_relay_that_stops_answering_after_data_times_out_the_send() {
    use notification_svc::transport::{SEND_TIMEOUT, SmtpTransport};
    let sink = saga_tests::smtp::SmtpSink::start_controlled().await;
    sink.set_mode(saga_tests::smtp::RelayMode::Hangs);
    let smtp = SmtpTransport::new(&sink.url, "orders@shop.example", None).unwrap();
    let email =
        notification_svc::domain::confirmation(Uuid::now_v7(), "a@example.com", &[], 100, "USD");
    let started = std::time::Instant::now();
    let sent = tokio::time::timeout(SEND_TIMEOUT * 3, smtp.send(&email))
        .await
        .expect("the send gives up on its own");
    assert!(matches!(sent, Err(SendError::Uncertain(_))), "{sent:?}");
    assert!(started.elapsed() < SEND_TIMEOUT * 2);
    assert_eq!(sink.received().len(), 1, "the relay has it");
}

/// Found in review: a replica handing a confirmation to the relay while
/// another handles the order's rollback. The rollback retracted the
/// notification and queued its cancellation due at once, the queued sender
/// sent it, and the confirmation landed after it: the customer's last word
/// was "confirmed" for a failed order. A cancellation that may overtake a
/// send in flight now waits as long as a send can last.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_confirmation_in_flight_when_its_order_fails_lands_before_the_cancellation() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab(std::time::Duration::ZERO).await;
    let history = History {
        orders: vec![OrderSpec {
            bounces: false,
            expired: false,
        }],
        steps: Vec::new(),
    };
    let mut run = Run::new(&lab, &history).await;
    let id = run.p.orders[0];
    run.step(&Step::Reserved { order: 0 }).await.unwrap();
    // The confirmation goes to one replica, the rollback to the other.
    let mut first_replica = std::mem::take(&mut run.p.queue);
    run.step(&Step::Rollback {
        order: 0,
        timeout: false,
    })
    .await
    .unwrap();
    lab.relay.set(Relay::HoldsConfirmations);
    let relay: &dyn EmailTransport = lab.relay.as_ref();
    let confirming = first_replica.deliver(&lab.lab.judge, 1, Fault::None);
    let rolling_back = async {
        lab.relay.holding.notified().await;
        let rolled_back = run.p.deliver(8, Fault::None).await;
        assert!(
            rolled_back
                .iter()
                .all(|o| matches!(o.verdict, common::messaging::judge::Verdict::Ack))
        );
        // The queued sender passes while the confirmation is in flight.
        notification_svc::queue::send_due(&lab.lab.pool, relay, &lab.health)
            .await
            .unwrap();
        lab.relay.release.notify_one();
    };
    let (confirmed, ()) = tokio::join!(confirming, rolling_back);
    assert!(
        confirmed
            .iter()
            .all(|o| matches!(o.verdict, common::messaging::judge::Verdict::Ack))
    );
    assert_eq!(
        lab.relay.took(id),
        vec![EmailKind::Confirmation],
        "the cancellation overtook the confirmation in flight"
    );
    // Once a send's length has passed, the cancellation goes out.
    run.step(&Step::TimePasses).await.unwrap();
    run.step(&Step::Queue { crash: false }).await.unwrap();
    assert_eq!(
        lab.relay.took(id),
        vec![EmailKind::Confirmation, EmailKind::Cancellation]
    );
    lab.lab.close().await;
}

/// Found in review: a confirmation claimed, then never taken — the relay
/// refused the connection, at the batch's try or at the queued sender's —
/// kept the mark "the relay may have it", and the order's rollback sent a
/// cancellation of an order the customer had never heard of. A refused
/// connection now clears the mark (unless an earlier attempt may have
/// delivered it).
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_confirmation_the_relay_never_took_is_not_cancelled() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab(std::time::Duration::ZERO).await;
    let deliver = Step::Deliver {
        size: 1,
        fault: Fault::None,
    };
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "the batch's try is refused",
            vec![
                Step::Relay(Relay::Down),
                Step::Reserved { order: 0 },
                deliver.clone(),
            ],
        ),
        (
            "the queued sender's try is refused too",
            vec![
                Step::Relay(Relay::Down),
                Step::Reserved { order: 0 },
                deliver.clone(),
                Step::TimePasses,
                Step::Queue { crash: false },
            ],
        ),
    ];
    for (what, steps) in cases {
        let history = History {
            orders: vec![OrderSpec {
                bounces: false,
                expired: false,
            }],
            steps: steps
                .into_iter()
                .chain([
                    Step::Rollback {
                        order: 0,
                        timeout: false,
                    },
                    deliver.clone(),
                ])
                .collect(),
        };
        let run = Run::new(&lab, &history).await;
        let id = run.p.orders[0];
        if let Err(violation) = run.play().await {
            panic!("{what}:\n{violation}");
        }
        assert_eq!(lab.relay.took(id), vec![], "{what}");
    }
    lab.lab.close().await;
}
