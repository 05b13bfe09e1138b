//! Defect 4 of issue 23: a process that crashed on one message returned
//! its whole prefetch, and the consumer went by the broker's count of
//! deliveries to find the culprit. RabbitMQ 3.x counts every return of
//! every prefetched message, so after ten crashes the culprit's batch-mates
//! were parked with it as `crash_loop`; RabbitMQ 4.x counts no return of a
//! closed channel, so nothing was ever parked and the crash loop went on.
//! The consumer now counts, durably, how often each redelivered message was
//! handled as a suspect (`messaging::crash_loop`). This test plays both
//! counting rules: a handler that "crashes the process" (hangs: the batch
//! is dropped and every message of it delivered again) whenever its batch
//! holds the marked message. Only that one may end parked.

use common::messaging::delivery::Incoming;
use common::messaging::handler::{HandlerError, MessageHandler, MessageResult};
use common::messaging::topology::PAYMENT_SVC;
use common::messaging::unit_of_work::UnitOfWork;
use payment_svc::handlers::PaymentHandler;
use saga_tests::Svc;
use uuid::Uuid;

use crate::harness::{self, Fault, Lab, Player};

/// payment-svc's handler, in a process that dies whenever it handles the
/// marked message.
struct Poisoned(PaymentHandler);

impl MessageHandler for Poisoned {
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        self.0.compensation(routing_key)
    }

    async fn handle_batch(
        &self,
        uow: &mut UnitOfWork,
        batch: &[Incoming],
    ) -> Result<Vec<MessageResult>, HandlerError> {
        let marked = |m: &Incoming| {
            m.body
                .windows(common::messaging::judge::CRASH_MARK.len())
                .any(|w| w == common::messaging::judge::CRASH_MARK)
        };
        if batch.iter().any(marked) {
            std::future::pending::<()>().await;
        }
        self.0.handle_batch(uow, batch).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_only_the_culprit_of_a_crash_loop_is_parked_whatever_the_brokers_count() {
    let _serial = harness::SERIAL.lock().await;
    let lab = Lab::new(
        PAYMENT_SVC,
        Svc::Payment,
        &payment_svc::MIGRATOR,
        |pool, _| {
            Poisoned(PaymentHandler {
                pool,
                opener: common::saga::card::CardOpener::new(None).expect("the development key"),
                default_balance_cents: 100_000,
            })
        },
    )
    .await;
    for (rule, counts_returns) in [("RabbitMQ 3.x", true), ("RabbitMQ 4.x", false)] {
        let mut p = Player::new(&lab, 0).await;
        p.queue.counts_returns = counts_returns;
        p.queue.crash_after = std::time::Duration::from_millis(300);
        let tag = &Uuid::new_v4().simple().to_string()[..8];
        let customers: Vec<String> = ["alice", "crash-the-process", "bob", "carol"]
            .iter()
            .map(|c| format!("{c}-{tag}"))
            .collect();
        for customer in &customers {
            let order_id = Uuid::now_v7();
            p.orders.push(order_id);
            p.send(&crate::payment::created(order_id, customer, 1000));
        }
        for _ in 0..20 {
            if p.queue.is_empty() {
                break;
            }
            p.deliver(4, Fault::None).await;
        }
        assert!(p.queue.is_empty(), "{rule}: the crash loop goes on");
        let dead: Vec<String> = p
            .queue
            .dead
            .iter()
            .map(|(m, why)| format!("{}: {why}", String::from_utf8_lossy(&m.body)))
            .collect();
        assert_eq!(dead.len(), 1, "{rule}: parked {dead:#?}");
        assert!(
            dead[0].contains("crash-the-process") && dead[0].contains("keeps crashing the process"),
            "{rule}: {dead:?}"
        );
        let charged: i64 = sqlx::query_scalar(
            "select count(*) from payments where order_id = any($1) and status = 'charged'",
        )
        .bind(&p.orders)
        .fetch_one(&lab.pool)
        .await
        .unwrap();
        assert_eq!(charged, 3, "{rule}: the culprit's batch-mates are charged");
    }
    lab.close().await;
}
