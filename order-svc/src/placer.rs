//! Group commit for HTTP orders.
//!
//! Each `POST /orders` hands its validated order to the placer and waits.
//! The placer takes every request that is waiting (up to [`MAX_BATCH`]) and
//! places them in one transaction — one statement to look up keys, one to
//! price, one to insert, one for the outbox, one commit — then answers each.
//! Under load many requests share a commit; alone, a request is placed at
//! once. If the batch fails as a whole, each request is placed on its own,
//! so one request's failure is never another's; and a request placed again
//! finds the order it placed if the batch did commit after all (the
//! answer to its COMMIT lost): its order id is fixed before the first
//! attempt ([`PlaceRequest::order_id`]).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use common::messaging::unit_of_work::UnitOfWork;

use crate::saga::{OrderSaga, PlaceError, PlaceRequest, Placement};

/// Requests placed in one transaction at most.
pub const MAX_BATCH: usize = 256;

struct Job {
    request: PlaceRequest,
    answer: oneshot::Sender<Result<Placement, PlaceError>>,
}

/// Hands orders to the placing task (cheap to clone).
#[derive(Clone)]
pub struct Placer {
    jobs: mpsc::Sender<Job>,
}

/// The placing task.
pub struct PlacerTask {
    queue: mpsc::Receiver<Job>,
}

impl Placer {
    pub fn new() -> (Placer, PlacerTask) {
        let (jobs, queue) = mpsc::channel(4 * MAX_BATCH);
        (Placer { jobs }, PlacerTask { queue })
    }

    /// Places one order (in whatever batch it lands in).
    pub async fn place(&self, request: PlaceRequest) -> Result<Placement, PlaceError> {
        let (answer, answered) = oneshot::channel();
        self.jobs
            .send(Job { request, answer })
            .await
            .map_err(|_| PlaceError::Unavailable)?;
        answered.await.map_err(|_| PlaceError::Unavailable)?
    }
}

impl PlacerTask {
    /// Places orders until `stop` fires and every queued one is placed.
    pub async fn run(mut self, saga: Arc<OrderSaga>, stop: CancellationToken) {
        let mut stopping = false;
        loop {
            let first = tokio::select! {
                job = self.queue.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    self.queue.close();
                    continue;
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            place_all(&saga, jobs).await;
        }
    }
}

/// Places a batch and answers each request.
async fn place_all(saga: &OrderSaga, jobs: Vec<Job>) {
    let (requests, answers): (Vec<PlaceRequest>, Vec<_>) =
        jobs.into_iter().map(|j| (j.request, j.answer)).unzip();
    for (answer, outcome) in answers.into_iter().zip(place_group(saga, &requests).await) {
        let _ = answer.send(outcome);
    }
}

/// Places `requests` in one transaction; if that fails, places each on its
/// own (a group of one is tried once more: its COMMIT may have taken
/// effect). One outcome per request, in order.
pub async fn place_group(
    saga: &OrderSaga,
    requests: &[PlaceRequest],
) -> Vec<Result<Placement, PlaceError>> {
    match place_in_one_transaction(saga, requests).await {
        Ok(outcomes) => outcomes,
        Err(error) => {
            common::store::pool::note_error(&error);
            warn!(%error, size = requests.len(), "placing a batch failed; placing its orders one by one");
            let mut outcomes = Vec::with_capacity(requests.len());
            for request in requests {
                outcomes.push(
                    match place_in_one_transaction(saga, std::slice::from_ref(request)).await {
                        Ok(mut outcomes) => outcomes.pop().unwrap_or(Err(PlaceError::Unavailable)),
                        Err(e) => Err(PlaceError::Db(e)),
                    },
                );
            }
            outcomes
        }
    }
}

async fn place_in_one_transaction(
    saga: &OrderSaga,
    requests: &[PlaceRequest],
) -> Result<Vec<Result<Placement, PlaceError>>, sqlx::Error> {
    let mut uow = UnitOfWork::begin(&saga.pool).await?;
    let mut outcomes = saga.place_batch(&mut uow, requests, &[]).await?;
    // A statement that failed for one request aborted the transaction the
    // batch shares, and PostgreSQL answers its COMMIT with a silent
    // rollback: never commit (and publish) after one.
    if let Some(failed) = outcomes
        .iter()
        .position(|o| matches!(o, Err(PlaceError::Db(_))))
        && let Err(PlaceError::Db(error)) = outcomes.swap_remove(failed)
    {
        return Err(error);
    }
    uow.commit(&saga.publisher).await?;
    Ok(outcomes)
}
