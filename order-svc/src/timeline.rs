//! `GET /sagas/{order_id}`: one saga across the four services.
//!
//! order-svc knows the events that reached it (the decision records the
//! trail that led to it; compensations are appended after). Each other
//! service serves its own steps for the order (`GET /sagas/{id}/steps`,
//! [`common::saga::timeline`]): a charge and its refund, a reservation and
//! its release, the emails sent, escalated compensations. This module asks
//! the three at read time, concurrently and with a short timeout, and
//! merges the logs; a service that does not answer is named in `sources` and
//! its steps are those order-svc saw. Nothing on the saga's critical path
//! changes for it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::messaging::events::EventType;
use common::messaging::topology::{INVENTORY_SVC, NOTIFICATION_SVC, PAYMENT_SVC};
use common::runtime::auth::Secret;
use common::saga::timeline::{
    CompensationState, MAX_ORDERS_PER_QUERY, Step, StepKind, StepLog, StepLogs, StepQuery,
};
use serde::Serialize;
use uuid::Uuid;

use crate::SERVICE;
use crate::db::{OrderRow, StepRow};
use crate::domain::{FailedStep, OrderStatus};

/// How long the merge waits for a service's steps.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The other services, asked for their steps of a saga.
#[derive(Clone)]
pub struct Peers {
    http: reqwest::Client,
    services: Vec<(&'static str, String)>,
    token: Option<Secret>,
}

impl Peers {
    /// `urls`: payment-svc's, inventory-svc's and notification-svc's base URLs.
    pub fn new(urls: [&str; 3], token: Option<Secret>) -> anyhow::Result<Peers> {
        let names = [PAYMENT_SVC.name, INVENTORY_SVC.name, NOTIFICATION_SVC.name];
        Ok(Peers {
            http: reqwest::Client::builder().timeout(PEER_TIMEOUT).build()?,
            services: names
                .into_iter()
                .zip(urls)
                .map(|(name, url)| (name, url.trim_end_matches('/').to_owned()))
                .collect(),
            token,
        })
    }

    /// Every peer's steps for the order, or why they are missing.
    async fn step_logs(&self, order_id: Uuid) -> Vec<(&'static str, Result<Vec<Step>, String>)> {
        let asks = self.services.iter().map(|(name, url)| async move {
            let request = self.http.get(format!("{url}/sagas/{order_id}/steps"));
            let answer: Result<StepLog, String> = self.ask(request).await;
            (*name, answer.map(|log| log.steps))
        });
        futures_util::future::join_all(asks).await
    }

    /// Every peer's steps for many orders (the reconciler's question), in
    /// requests of at most [`MAX_ORDERS_PER_QUERY`]; or why a peer's are
    /// missing.
    pub async fn step_logs_of(
        &self,
        order_ids: &[Uuid],
    ) -> Vec<(&'static str, Result<HashMap<Uuid, Vec<Step>>, String>)> {
        let asks = self.services.iter().map(|(name, url)| async move {
            let mut all = HashMap::with_capacity(order_ids.len());
            for chunk in order_ids.chunks(MAX_ORDERS_PER_QUERY) {
                let query = StepQuery {
                    order_ids: chunk.to_vec(),
                };
                let request = self.http.post(format!("{url}/sagas/steps")).json(&query);
                match self.ask::<StepLogs>(request).await {
                    Ok(logs) => all.extend(logs.logs.into_iter().map(|l| (l.order_id, l.steps))),
                    Err(why) => return (*name, Err(why)),
                }
            }
            (*name, Ok(all))
        });
        futures_util::future::join_all(asks).await
    }

    /// Sends a request with the token; the JSON answer, or why there is none.
    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<T, String> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        let response = request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        response
            .json()
            .await
            .map_err(|e| e.without_url().to_string())
    }
}

/// A step with its place on the saga's time axis.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TimedStep {
    #[serde(flatten)]
    pub step: Step,
    pub since_start_ms: i64,
    pub since_previous_ms: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DecisionView {
    pub outcome: &'static str,
    #[schema(required = true)]
    pub error: Option<String>,
    #[schema(required = true)]
    pub reason: Option<String>,
    #[schema(required = true)]
    pub failed_step: Option<&'static str>,
    #[schema(required = true)]
    pub at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompensationView {
    pub service: String,
    pub step: String,
    pub state: CompensationState,
    #[schema(required = true)]
    pub at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmailView {
    pub kind: String,
    pub sent_at: DateTime<Utc>,
}

/// The body of `GET /sagas/{order_id}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SagaView {
    pub order_id: Uuid,
    pub status: String,
    #[schema(required = true)]
    pub result: Option<common::saga::order::SagaResult>,
    pub created_at: DateTime<Utc>,
    pub deadline_at: DateTime<Utc>,
    #[schema(required = true)]
    pub decided_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub duration_ms: Option<i64>,
    #[schema(required = true)]
    pub decision: Option<DecisionView>,
    pub steps: Vec<TimedStep>,
    pub compensations: Vec<CompensationView>,
    pub emails: Vec<EmailView>,
    /// Per service: `ok`, or why its steps are missing.
    pub sources: BTreeMap<&'static str, String>,
}

/// Assembles the saga's view from order-svc's own record and the peers'.
pub async fn saga_view(peers: &Peers, order: &OrderRow, own: Vec<StepRow>) -> SagaView {
    let logs = peers.step_logs(order.order_id).await;
    merge(order, own, logs)
}

/// The merge itself (pure): each service's own account of its steps wins
/// over what order-svc heard of them; order-svc's record fills in for a
/// service that did not answer.
pub fn merge(
    order: &OrderRow,
    own: Vec<StepRow>,
    logs: Vec<(&'static str, Result<Vec<Step>, String>)>,
) -> SagaView {
    let mut sources = BTreeMap::from([(SERVICE, "ok".to_owned())]);
    let mut steps: Vec<Step> = Vec::new();
    let mut answered: Vec<&str> = Vec::new();
    for (service, log) in logs {
        match log {
            Ok(log) => {
                answered.push(service);
                sources.insert(service, "ok".to_owned());
                steps.extend(log);
            }
            Err(why) => {
                sources.insert(service, format!("unavailable: {why}"));
            }
        }
    }
    for row in own {
        // A service that answered told its own story of this event.
        let told = answered.contains(&row.source.as_str())
            && steps
                .iter()
                .any(|s| s.service == row.source && s.event == row.step);
        if !told {
            steps.push(order_step(&row));
        }
    }
    // Ties keep the log order: the choreography's.
    steps.sort_by_key(|s| s.at);

    let start = order.created_at;
    let mut previous = start;
    let steps: Vec<TimedStep> = steps
        .into_iter()
        .map(|step| {
            let timed = TimedStep {
                since_start_ms: (step.at - start).num_milliseconds(),
                since_previous_ms: (step.at - previous).num_milliseconds().max(0),
                step,
            };
            previous = previous.max(timed.step.at);
            timed
        })
        .collect();

    let status = order.status();
    let mut compensations: Vec<CompensationView> = steps
        .iter()
        .filter(|t| t.step.kind == StepKind::Compensation)
        .map(|t| CompensationView {
            service: t.step.service.clone(),
            step: t.step.event.clone(),
            state: t.step.state.unwrap_or(CompensationState::Done),
            at: Some(t.step.at),
            detail: t.step.detail.clone(),
        })
        .collect();
    if status == OrderStatus::Failed {
        compensations.extend(pending_compensations(&steps, &answered));
    }
    let emails = steps
        .iter()
        .filter(|t| t.step.service == NOTIFICATION_SVC.name && t.step.outcome == "sent")
        .map(|t| EmailView {
            kind: if t.step.kind == StepKind::Compensation {
                "cancellation".to_owned()
            } else {
                "confirmation".to_owned()
            },
            sent_at: t.step.at,
        })
        .collect();
    let decision = match status {
        OrderStatus::Pending => None,
        OrderStatus::Confirmed => Some(DecisionView {
            outcome: "confirmed",
            error: None,
            reason: None,
            failed_step: None,
            at: order.decided_at,
        }),
        OrderStatus::Failed => Some(DecisionView {
            outcome: "failed",
            failed_step: order
                .error
                .as_deref()
                .and_then(FailedStep::from_error)
                .map(FailedStep::label),
            error: order.error.clone(),
            reason: order.reason.clone(),
            at: order.decided_at,
        }),
    };
    SagaView {
        order_id: order.order_id,
        status: order.status.clone(),
        result: order.result(),
        created_at: order.created_at,
        deadline_at: order.deadline_at,
        decided_at: order.decided_at,
        duration_ms: order
            .decided_at
            .map(|d| (d - order.created_at).num_milliseconds()),
        decision,
        steps,
        compensations,
        emails,
        sources,
    }
}

/// Side effects of a failed saga that are not undone yet: a charge with no
/// refund, stock held and not released (as far as the answering services
/// tell; escalations show as their own compensation steps).
fn pending_compensations(steps: &[TimedStep], answered: &[&str]) -> Vec<CompensationView> {
    let has = |service: &str, event: &str, outcome: &str| {
        steps.iter().any(|t| {
            t.step.service == service && t.step.event == event && t.step.outcome == outcome
        })
    };
    let compensated = |service: &str, event: &str| {
        steps.iter().any(|t| {
            t.step.service == service
                && t.step.kind == StepKind::Compensation
                && (t.step.event == event || t.step.state.is_some())
        })
    };
    let mut pending = Vec::new();
    let undone = [
        (
            PAYMENT_SVC.name,
            "payment.completed",
            "charged",
            EventType::PaymentRefunded,
        ),
        (
            INVENTORY_SVC.name,
            "inventory.reserved",
            "reserved",
            EventType::InventoryReleased,
        ),
    ];
    for (service, event, outcome, undo) in undone {
        if answered.contains(&service)
            && has(service, event, outcome)
            && !compensated(service, undo.routing_key())
        {
            pending.push(CompensationView {
                service: service.to_owned(),
                step: undo.routing_key().to_owned(),
                state: CompensationState::Pending,
                at: None,
                detail: None,
            });
        }
    }
    pending
}

/// An event order-svc recorded, as a step.
fn order_step(row: &StepRow) -> Step {
    let event = EventType::from_routing_key(&row.step);
    let kind = match event {
        Some(EventType::OrderConfirmed | EventType::OrderFailed | EventType::OrderCancelled) => {
            StepKind::Decision
        }
        Some(EventType::PaymentRefunded | EventType::InventoryReleased) => StepKind::Compensation,
        _ => StepKind::Action,
    };
    let outcome = match event {
        Some(
            EventType::PaymentFailed
            | EventType::InventoryFailed
            | EventType::NotificationFailed
            | EventType::OrderFailed
            | EventType::OrderCancelled,
        ) => "failed",
        _ => "ok",
    };
    Step::new(row.occurred_at, &row.source, &row.step, kind, outcome).detail(row.detail.clone())
}
