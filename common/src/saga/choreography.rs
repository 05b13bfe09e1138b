//! The saga's choreography, declared once: which service reacts to which
//! event, what it may emit, what side effect it has, and what undoes it.
//!
//! There is no orchestrator, so this table is the only place the whole saga
//! is written down. Everything else reads it: the broker bindings
//! ([`crate::messaging::topology`] binds each service's queues to the events
//! it reacts to here), the unit tests below (which walk every path and prove
//! that each ends decided and that every side effect is undone on failure or
//! is marked irreversible), the Mermaid diagram in `docs/choreography.md`
//! (checked against [`mermaid`] by a test) and the explorer
//! (`GET /sagas/choreography`).

use serde::Serialize;
use utoipa::ToSchema;

use crate::messaging::events::EventType;

/// What starts a reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "kind", content = "event")]
pub enum Trigger {
    /// An event on the exchange.
    Event(EventType),
    /// The saga's deadline passing (order-svc's timeout watcher).
    Deadline,
    /// An outside answer (an HTTP call to the service) to the step that
    /// emitted this event, e.g. the gateway's 3-D Secure result.
    Callback(EventType),
}

/// How the reacting service receives its trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// The service's durable work queue: at least once, deduplicated.
    Durable,
    /// Each replica's transient queue: best effort, only to know how far a
    /// saga has got (nothing depends on it being seen).
    Observed,
    /// Not a message: a timer of the service's own.
    Timer,
    /// Not a message: an HTTP request to the service.
    Request,
}

/// The role of a reaction in the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A forward step with a business effect.
    Action,
    /// order-svc deciding the saga (confirmed or failed).
    Decision,
    /// Undoing a forward step after the saga failed.
    Compensation,
    /// Only recorded (the saga's timeline); no effect.
    Record,
    /// The saga waits for an outside answer, under its long deadline.
    Wait,
}

/// What a reaction's side effect needs when the saga fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Undo {
    /// No side effect to undo.
    Nothing,
    /// Undone by the named compensation of the same service.
    CompensatedBy { step: &'static str },
    /// Cannot be undone; why that is acceptable.
    Irreversible { why: &'static str },
}

/// One reaction of one service.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct Reaction {
    /// The reacting service (a [`crate::messaging::topology::ServiceIdentity`] name).
    pub service: &'static str,
    /// A short name of what it does (`charge`, `refund`...).
    pub step: &'static str,
    pub on: &'static [Trigger],
    pub delivery: Delivery,
    pub kind: StepKind,
    /// The alternative outcomes, each the events it emits together; the
    /// first is the success path. An empty alternative emits nothing.
    pub outcomes: &'static [&'static [EventType]],
    /// The step whose deferred outcome this one completes (the confirmation
    /// of a charge that needed the customer's action).
    #[schema(required = true)]
    pub completes: Option<&'static str>,
    pub undo: Undo,
}

use EventType::*;

const FAILURE: &[Trigger] = &[Trigger::Event(OrderFailed), Trigger::Event(OrderCancelled)];

/// The whole saga.
pub const REACTIONS: &[Reaction] = &[
    Reaction {
        service: "order-svc",
        step: "place order",
        on: &[Trigger::Event(OrderRequested)],
        delivery: Delivery::Durable,
        kind: StepKind::Action,
        // Invalid input creates no order (the client is answered and the
        // request parked): no saga starts, so it is not an outcome here.
        outcomes: &[&[OrderCreated]],
        // The order row is the saga's own state: every failure path ends it
        // FAILED (the decision), which is its undoing.
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "payment-svc",
        step: "charge",
        on: &[Trigger::Event(OrderCreated)],
        delivery: Delivery::Durable,
        kind: StepKind::Action,
        // A card that needs 3-D Secure is not charged yet: the outcome is
        // deferred to "confirm payment".
        outcomes: &[
            &[PaymentCompleted],
            &[PaymentFailed],
            &[PaymentActionRequired],
        ],
        completes: None,
        undo: Undo::CompensatedBy { step: "refund" },
    },
    Reaction {
        service: "inventory-svc",
        step: "reserve stock",
        on: &[Trigger::Event(PaymentCompleted)],
        delivery: Delivery::Durable,
        kind: StepKind::Action,
        // Short of a backorderable item: deferred to "fulfil backorder".
        outcomes: &[
            &[InventoryReserved],
            &[InventoryFailed],
            &[InventoryBackordered],
        ],
        completes: None,
        undo: Undo::CompensatedBy {
            step: "release stock",
        },
    },
    Reaction {
        service: "notification-svc",
        step: "send confirmation email",
        on: &[Trigger::Event(InventoryReserved)],
        delivery: Delivery::Durable,
        kind: StepKind::Action,
        // The mail relay down: the email is queued and the saga confirmed
        // (past the pivot the email is retried, never undone).
        outcomes: &[
            &[NotificationSent],
            &[NotificationFailed],
            &[NotificationDeferred],
        ],
        completes: None,
        undo: Undo::Irreversible {
            why: "an email cannot be unsent: it is the last step, and if the saga still fails \
                  (its deadline passed) a cancellation email follows",
        },
    },
    Reaction {
        service: "order-svc",
        step: "confirm",
        on: &[
            Trigger::Event(NotificationSent),
            Trigger::Event(NotificationDeferred),
        ],
        delivery: Delivery::Durable,
        kind: StepKind::Decision,
        // Past the deadline the saga is already failed and this is ignored.
        outcomes: &[&[OrderConfirmed]],
        completes: None,
        undo: Undo::Irreversible {
            why: "the pivot: once confirmed, the saga only goes forward",
        },
    },
    Reaction {
        service: "order-svc",
        step: "fail",
        on: &[
            Trigger::Event(PaymentFailed),
            Trigger::Event(InventoryFailed),
            Trigger::Event(NotificationFailed),
        ],
        delivery: Delivery::Durable,
        kind: StepKind::Decision,
        outcomes: &[&[OrderFailed]],
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "order-svc",
        step: "time out",
        on: &[Trigger::Deadline],
        delivery: Delivery::Timer,
        kind: StepKind::Decision,
        outcomes: &[&[OrderCancelled, OrderFailed]],
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "order-svc",
        step: "observe progress",
        on: &[
            Trigger::Event(PaymentCompleted),
            Trigger::Event(InventoryReserved),
        ],
        delivery: Delivery::Observed,
        kind: StepKind::Record,
        outcomes: &[&[]],
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "inventory-svc",
        step: "commit stock",
        on: &[Trigger::Event(OrderConfirmed)],
        delivery: Delivery::Durable,
        kind: StepKind::Action,
        outcomes: &[&[]],
        completes: None,
        undo: Undo::Irreversible {
            why: "the saga is confirmed: the held units are sold",
        },
    },
    Reaction {
        service: "payment-svc",
        step: "refund",
        on: FAILURE,
        delivery: Delivery::Durable,
        kind: StepKind::Compensation,
        // Nothing to refund when the charge never happened (a tombstone
        // then refuses a late charge).
        outcomes: &[&[PaymentRefunded], &[]],
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "inventory-svc",
        step: "release stock",
        on: FAILURE,
        delivery: Delivery::Durable,
        kind: StepKind::Compensation,
        outcomes: &[&[InventoryReleased], &[]],
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "notification-svc",
        step: "send cancellation email",
        on: FAILURE,
        delivery: Delivery::Durable,
        kind: StepKind::Compensation,
        // Only if a confirmation went out; otherwise a tombstone stops it.
        outcomes: &[&[]],
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "order-svc",
        step: "record compensation",
        on: &[
            Trigger::Event(PaymentRefunded),
            Trigger::Event(InventoryReleased),
        ],
        delivery: Delivery::Durable,
        kind: StepKind::Record,
        outcomes: &[&[]],
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "order-svc",
        step: "await outside answer",
        on: &[
            Trigger::Event(PaymentActionRequired),
            Trigger::Event(InventoryBackordered),
        ],
        delivery: Delivery::Durable,
        kind: StepKind::Wait,
        // The client is answered "pending"; the saga's deadline becomes its
        // long deadline (the timeout watcher covers both).
        outcomes: &[&[]],
        completes: None,
        undo: Undo::Nothing,
    },
    Reaction {
        service: "inventory-svc",
        step: "hold stock",
        on: &[Trigger::Event(PaymentActionRequired)],
        delivery: Delivery::Durable,
        kind: StepKind::Action,
        // Held (until the long deadline) without announcing it: the
        // reservation is announced once the payment is confirmed.
        outcomes: &[&[], &[InventoryFailed]],
        completes: None,
        undo: Undo::CompensatedBy {
            step: "release stock",
        },
    },
    Reaction {
        service: "notification-svc",
        step: "send queued email",
        // The relay back: a queued confirmation goes out (retried with
        // back-off until it does).
        on: &[Trigger::Callback(NotificationDeferred)],
        delivery: Delivery::Timer,
        kind: StepKind::Action,
        outcomes: &[&[]],
        completes: Some("send confirmation email"),
        undo: Undo::Irreversible {
            why: "the saga is confirmed: the email is retried until it goes out",
        },
    },
    Reaction {
        service: "inventory-svc",
        step: "fulfil backorder",
        // The stock arriving (`PUT /items/{id}`).
        on: &[Trigger::Callback(InventoryBackordered)],
        delivery: Delivery::Request,
        kind: StepKind::Action,
        outcomes: &[&[InventoryReserved]],
        completes: Some("reserve stock"),
        undo: Undo::CompensatedBy {
            step: "release stock",
        },
    },
    Reaction {
        service: "payment-svc",
        step: "confirm payment",
        on: &[Trigger::Callback(PaymentActionRequired)],
        delivery: Delivery::Request,
        kind: StepKind::Action,
        outcomes: &[&[PaymentCompleted], &[PaymentFailed]],
        completes: Some("charge"),
        undo: Undo::CompensatedBy { step: "refund" },
    },
];

/// The events that decide a saga.
pub const DECISIONS: [EventType; 2] = [OrderConfirmed, OrderFailed];

/// The events `service` receives with the given delivery, in declaration order.
pub fn triggers(service: &str, delivery: Delivery) -> Vec<EventType> {
    let mut events = Vec::new();
    for r in REACTIONS
        .iter()
        .filter(|r| r.service == service && r.delivery == delivery)
    {
        for t in r.on {
            if let Trigger::Event(e) = t
                && !events.contains(e)
            {
                events.push(*e);
            }
        }
    }
    events
}

/// The reactions an event triggers.
pub fn reactions_to(trigger: Trigger) -> impl Iterator<Item = &'static Reaction> {
    REACTIONS.iter().filter(move |r| r.on.contains(&trigger))
}

/// The reaction named `step` of `service`.
pub fn reaction(service: &str, step: &str) -> Option<&'static Reaction> {
    REACTIONS
        .iter()
        .find(|r| r.service == service && r.step == step)
}

/// The choreography as a Mermaid flowchart: events as rounded nodes,
/// reactions as boxes grouped by service, failure outcomes and compensations
/// dashed. `docs/choreography.md` embeds exactly this text.
pub fn mermaid() -> String {
    use std::fmt::Write as _;

    let event_node = |e: EventType| e.routing_key().replace('.', "_");
    let mut out = String::from("flowchart TD\n");
    let mut events: Vec<EventType> = Vec::new();
    for r in REACTIONS {
        for t in r.on {
            if let Trigger::Event(e) = t
                && !events.contains(e)
            {
                events.push(*e);
            }
        }
        for e in r.outcomes.iter().flat_map(|o| o.iter()) {
            if !events.contains(e) {
                events.push(*e);
            }
        }
    }
    for e in &events {
        let _ = writeln!(out, "    {}([{}])", event_node(*e), e.routing_key());
    }
    out.push_str("    deadline{{deadline passed}}\n");
    let mut services: Vec<&str> = Vec::new();
    for r in REACTIONS {
        if !services.contains(&r.service) {
            services.push(r.service);
        }
    }
    for service in services {
        let _ = writeln!(out, "    subgraph {}[{service}]", service.replace('-', "_"));
        for (i, r) in REACTIONS.iter().enumerate() {
            if r.service == service {
                let _ = writeln!(out, "        r{i}[\"{}\"]", r.step);
            }
        }
        out.push_str("    end\n");
    }
    for (i, r) in REACTIONS.iter().enumerate() {
        let arrow = match r.delivery {
            Delivery::Observed => "-.->|observed|",
            _ => "-->",
        };
        for t in r.on {
            let (from, arrow) = match t {
                Trigger::Event(e) => (event_node(*e), arrow),
                Trigger::Deadline => ("deadline".to_owned(), arrow),
                Trigger::Callback(e) => (event_node(*e), "-.->|outside answer|"),
            };
            let _ = writeln!(out, "    {from} {arrow} r{i}");
        }
        for (n, outcome) in r.outcomes.iter().enumerate() {
            let arrow = if n == 0 { "-->" } else { "-.->" };
            for e in outcome.iter() {
                let _ = writeln!(out, "    r{i} {arrow} {}", event_node(*e));
            }
        }
        if let Undo::CompensatedBy { step } = r.undo
            && let Some(j) = REACTIONS
                .iter()
                .position(|c| c.service == r.service && c.step == step)
        {
            let _ = writeln!(out, "    r{j} -. undoes .-> r{i}");
        }
    }
    for (i, r) in REACTIONS.iter().enumerate() {
        let class = match (r.kind, r.undo) {
            (StepKind::Compensation, _) => "compensation",
            (_, Undo::Irreversible { .. }) => "irreversible",
            (StepKind::Decision, _) => "decision",
            (StepKind::Record, _) => "record",
            _ => "step",
        };
        let _ = writeln!(out, "    class r{i} {class}");
    }
    out.push_str(
        "    classDef compensation stroke-dasharray: 4 3,fill:#fff4e5\n\
         \x20   classDef irreversible fill:#fde8e8\n\
         \x20   classDef decision fill:#e8f0fe\n\
         \x20   classDef step fill:#f4f4f4\n\
         \x20   classDef record fill:#ffffff,color:#666\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::messaging::topology::SERVICES;

    /// A saga's state while walking the choreography: what has been
    /// published, which steps ran (and whether they succeeded), whether the
    /// deadline fired.
    #[derive(Clone, Default)]
    struct Walk {
        published: Vec<EventType>,
        ran: Vec<(&'static str, &'static str, usize)>,
        decision: Option<EventType>,
        deadline_fired: bool,
    }

    impl Walk {
        /// Ran with its success outcome, or deferred it to a step that did.
        fn ran_successfully(&self, service: &str, step: &str) -> bool {
            self.ran.iter().any(|(s, st, outcome)| {
                *s == service
                    && *outcome == 0
                    && (*st == step || reaction(s, st).and_then(|r| r.completes) == Some(step))
            })
        }
    }

    /// Every complete run of the saga: each reaction takes each of its
    /// outcomes in turn, and the deadline may pass before any step. Decisions
    /// are conditional (the first wins), as order-svc makes them.
    fn walk_all() -> Vec<Walk> {
        let mut done = Vec::new();
        let mut start = Walk::default();
        start.published.push(OrderRequested);
        let mut todo = vec![(start, 0usize)];
        while let Some((walk, next)) = todo.pop() {
            assert!(walk.published.len() < 64, "the choreography loops");
            // The deadline may pass before the next event is handled.
            if walk.decision.is_none() && !walk.deadline_fired {
                let mut w = walk.clone();
                w.deadline_fired = true;
                fire(&mut w, Trigger::Deadline, &mut todo, next);
            }
            let Some(&event) = walk.published.get(next) else {
                done.push(walk);
                continue;
            };
            let mut w = walk.clone();
            fire(&mut w, Trigger::Event(event), &mut todo, next + 1);
        }
        done
    }

    /// Runs every reaction to `trigger` (and the outside answer an event
    /// awaits), branching on their outcomes.
    fn fire(walk: &mut Walk, trigger: Trigger, todo: &mut Vec<(Walk, usize)>, next: usize) {
        let mut branches = vec![walk.clone()];
        let callbacks = match trigger {
            Trigger::Event(e) => Some(reactions_to(Trigger::Callback(e))),
            _ => None,
        };
        for r in reactions_to(trigger).chain(callbacks.into_iter().flatten()) {
            let mut grown = Vec::new();
            for b in &branches {
                // A decision taken once is not taken again.
                if r.kind == StepKind::Decision && b.decision.is_some() {
                    grown.push(b.clone());
                    continue;
                }
                for (i, outcome) in r.outcomes.iter().enumerate() {
                    let mut w = b.clone();
                    w.ran.push((r.service, r.step, i));
                    for e in outcome.iter() {
                        if DECISIONS.contains(e) && w.decision.is_none() {
                            w.decision = Some(*e);
                        }
                        w.published.push(*e);
                    }
                    grown.push(w);
                }
            }
            branches = grown;
        }
        todo.extend(branches.into_iter().map(|w| (w, next)));
    }

    #[test]
    fn every_path_ends_decided_once() {
        let walks = walk_all();
        assert!(walks.len() > 10, "the walk explores the saga's branches");
        for w in &walks {
            assert!(w.decision.is_some(), "undecided path: {:?}", w.published);
            let decisions = w.published.iter().filter(|e| DECISIONS.contains(e)).count();
            assert_eq!(decisions, 1, "decided twice: {:?}", w.published);
        }
        let outcomes: BTreeSet<_> = walks
            .iter()
            .filter_map(|w| w.decision.map(EventType::routing_key))
            .collect();
        assert_eq!(
            outcomes.len(),
            2,
            "both confirmation and failure are reachable"
        );
    }

    #[test]
    fn a_confirmed_saga_ran_every_forward_step_successfully() {
        for w in walk_all()
            .iter()
            .filter(|w| w.decision == Some(OrderConfirmed))
        {
            // Every forward step whose trigger happened on this path.
            for r in REACTIONS.iter().filter(|r| {
                r.kind == StepKind::Action
                    && r.on
                        .iter()
                        .all(|t| !matches!(t, Trigger::Event(OrderConfirmed)))
                    && r.on.iter().any(|t| match t {
                        Trigger::Event(e) | Trigger::Callback(e) => w.published.contains(e),
                        Trigger::Deadline => false,
                    })
            }) {
                assert!(
                    w.ran_successfully(r.service, r.step),
                    "{} {} did not succeed but the saga confirmed: {:?}",
                    r.service,
                    r.step,
                    w.published
                );
            }
        }
    }

    #[test]
    fn every_side_effect_of_a_failed_saga_is_compensated_or_irreversible() {
        for r in REACTIONS.iter().filter(|r| r.kind == StepKind::Action) {
            match r.undo {
                Undo::CompensatedBy { step } => {
                    let c = reaction(r.service, step).unwrap_or_else(|| {
                        panic!("{} names a missing compensation {step}", r.step)
                    });
                    assert_eq!(c.kind, StepKind::Compensation);
                    assert_eq!(
                        c.delivery,
                        Delivery::Durable,
                        "a compensation is never best effort"
                    );
                }
                Undo::Irreversible { why } => assert!(!why.is_empty()),
                Undo::Nothing => assert_eq!(
                    (r.service, r.step),
                    ("order-svc", "place order"),
                    "only the order itself needs no undo"
                ),
            }
        }
        for w in walk_all()
            .iter()
            .filter(|w| w.decision == Some(OrderFailed))
        {
            for (service, step, outcome) in &w.ran {
                let r = reaction(service, step).expect("ran a declared step");
                if let (Undo::CompensatedBy { step: undo }, 0) = (r.undo, *outcome) {
                    assert!(
                        w.ran.iter().any(|(s, st, _)| s == service && *st == undo),
                        "{service} {step} was not undone on a failed path: {:?}",
                        w.published
                    );
                }
            }
        }
    }

    #[test]
    fn every_emitted_event_is_handled_or_terminal() {
        for r in REACTIONS {
            for e in r.outcomes.iter().flat_map(|o| o.iter()) {
                let handled =
                    reactions_to(Trigger::Event(*e)).any(|c| c.delivery == Delivery::Durable);
                assert!(handled, "{} has no durable consumer", e.routing_key());
            }
        }
    }

    #[test]
    fn every_reacting_service_exists() {
        for r in REACTIONS {
            assert!(
                SERVICES.iter().any(|s| s.name == r.service),
                "unknown service {}",
                r.service
            );
        }
    }

    #[test]
    fn the_docs_show_the_declared_choreography() {
        let docs = include_str!("../../../docs/choreography.md");
        assert!(
            docs.contains(&mermaid()),
            "docs/choreography.md is out of date: paste the output of \
             `cargo test -p common choreography -- --ignored --nocapture print_mermaid`"
        );
    }

    #[test]
    #[ignore = "prints the diagram for docs/choreography.md"]
    fn print_mermaid() {
        println!("{}", mermaid());
    }
}
