//! This replica's own queue, `order-svc.replica.<id>`: transient, exclusive
//! to the replica's connection, consumed without acks.
//!
//! Two kinds of message arrive there:
//! - the forward steps order-svc observes (`payment.completed`,
//!   `inventory.reserved`), recorded in [`crate::progress`] so that a
//!   timeout names the step it was waiting for;
//! - decisions another replica made for orders whose HTTP request waits
//!   here (`type` = `order.decision`, `correlation_id` = the order), handed
//!   to [`crate::decisions`].
//!
//! Both are hints: losing one (a reconnect drops the queue) costs a less
//! precise timeout reason or a second of latency, never correctness.

use std::sync::Arc;
use std::time::Duration;

use common::messaging::broker::{Broker, SETUP_TIMEOUT, timeout_error};
use common::messaging::events::EventType;
use common::messaging::topology::{ORDER_SVC, declare_replica_queue};
use common::messaging::trust::ProducerTrust;
use common::saga::order::SagaResult;
use futures_util::StreamExt as _;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::saga::{DECISION_NOTICE, OrderSaga};

/// How long progress is remembered for a saga this replica did not decide.
const PROGRESS_TTL: Duration = Duration::from_secs(120);

/// Consumes this replica's queue until `cancel` fires; survives broker loss.
pub async fn run(
    saga: Arc<OrderSaga>,
    broker: Broker,
    trust: ProducerTrust,
    cancel: CancellationToken,
) {
    let mut prune = tokio::time::interval(Duration::from_secs(10));
    loop {
        let Some(conn) = broker.connection(&cancel).await else {
            return;
        };
        let setup = async {
            let channel = conn.create_channel().await?;
            declare_replica_queue(&channel, &ORDER_SVC, &saga.replica_queue).await?;
            let deliveries = channel
                .basic_consume(
                    saga.replica_queue.as_str().into(),
                    "replica".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, deliveries))
        };
        let (channel, mut deliveries) = match tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .unwrap_or_else(|_| Err(timeout_error("declaring the replica queue")))
        {
            Ok(set) => set,
            Err(error) => {
                warn!(%error, "replica queue unavailable; retrying");
                broker.report_broken(&conn);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        info!(queue = %saga.replica_queue, "observing saga progress");
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = channel.close(200, "stopping".into()).await;
                    return;
                }
                _ = prune.tick() => saga.progress.prune(PROGRESS_TTL),
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => handle(&saga, &trust, &delivery),
                    Some(Err(error)) => {
                        warn!(%error, "replica queue consumer failed; restarting");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

fn handle(saga: &OrderSaga, trust: &ProducerTrust, delivery: &lapin::message::Delivery) {
    let props = &delivery.properties;
    let sender = props.user_id().as_ref().map(|u| u.as_str());
    let Some(order_id) = props
        .correlation_id()
        .as_ref()
        .and_then(|c| c.as_str().parse::<Uuid>().ok())
    else {
        return;
    };
    let kind = props.kind().as_ref().map(|k| k.as_str());
    if kind == Some(DECISION_NOTICE) {
        // Only another order-svc replica may answer a waiting request.
        if sender != Some(trust.user_of(ORDER_SVC.name)) {
            warn!(order_id = %order_id, "decision notice from a user other than order-svc's ignored");
            return;
        }
        match serde_json::from_slice::<SagaResult>(&delivery.data) {
            Ok(result) => saga.waiters.resolve(order_id, &result),
            Err(error) => debug!(%error, "unreadable decision notice"),
        }
    } else if let Some(step) = EventType::from_routing_key(delivery.routing_key.as_str())
        && trust.check(step, sender).is_ok()
    {
        saga.progress.record(order_id, step);
    }
}
