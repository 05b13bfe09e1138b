//! Placing the orders: closed loop (`C` in flight, the next one starts when
//! one finishes) or open loop (orders start on a fixed schedule whatever
//! happens, and latency counts from the scheduled start, so a stall cannot
//! hide), over HTTP or over AMQP (`order.requested` with `reply_to`).
//!
//! Like a real client, the driver retries an order that got no answer (an
//! HTTP error, a 5xx) with the same idempotency key; the latency includes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use indicatif::ProgressBar;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore, oneshot};
use tokio::time::Instant;

use super::target::Target;
use super::workload::Order;
use common::messaging::events::EXCHANGE;

/// How orders enter the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Entry {
    /// `POST /orders` on order-svc (round-robin over its replicas).
    Http,
    /// `order.requested` on `saga.events`, result through `reply_to`.
    Amqp,
}

/// How orders are started.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// `concurrency` orders in flight.
    Closed { concurrency: usize },
    /// `rate` orders started per second.
    Open { rate: f64 },
}

/// One placed order.
#[derive(Debug, Clone)]
pub struct Sample {
    pub order: Order,
    pub key: String,
    /// When it started (closed loop) or was due to start (open loop), from
    /// the start of the run.
    pub started: Duration,
    pub latency: Duration,
    /// The result dict.
    pub result: Value,
}

/// Places orders through one entry.
#[derive(Clone)]
pub enum Client {
    Http {
        http: reqwest::Client,
        urls: Arc<Vec<String>>,
    },
    Amqp(Arc<AmqpClient>),
}

impl Client {
    pub async fn new(entry: Entry, target: &Target) -> anyhow::Result<Client> {
        Ok(match entry {
            Entry::Http => Client::Http {
                http: super::target::http_client()
                    .pool_max_idle_per_host(1024)
                    .build()?,
                urls: Arc::new(target.order_urls.clone()),
            },
            Entry::Amqp => Client::Amqp(Arc::new(AmqpClient::connect(&target.amqp_url).await?)),
        })
    }

    /// Places an order and waits for its result dict.
    pub async fn place(&self, order: &Order, key: &str) -> Value {
        match self {
            Client::Http { http, urls } => loop {
                let sent = http
                    .post(format!("{}/orders", urls[order.index % urls.len()]))
                    .header("Idempotency-Key", key)
                    .json(&order.dict())
                    .send()
                    .await;
                if let Ok(r) = sent
                    && r.status().is_success()
                    && let Ok(v) = r.json::<Value>().await
                {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            },
            Client::Amqp(amqp) => amqp.place(order, key).await,
        }
    }
}

/// An AMQP client: publishes `order.requested` with `reply_to` its own
/// queue, and hands each reply to the order waiting for it.
pub struct AmqpClient {
    _conn: Connection,
    channel: Channel,
    reply_queue: String,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
}

impl AmqpClient {
    async fn connect(url: &str) -> anyhow::Result<AmqpClient> {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let reply_queue = q.name().to_string();
        let replies = conn.create_channel().await?;
        let mut consumer = replies
            .basic_consume(
                reply_queue.as_str().into(),
                "saga-bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>> = Arc::default();
        let w = waiting.clone();
        tokio::spawn(async move {
            let _replies = replies;
            while let Some(Ok(d)) = consumer.next().await {
                let Some(corr) = d
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string())
                else {
                    continue;
                };
                if let (Some(tx), Ok(v)) = (
                    w.lock().await.remove(&corr),
                    serde_json::from_slice(&d.data),
                ) {
                    let _ = tx.send(v);
                }
            }
        });
        Ok(AmqpClient {
            _conn: conn,
            channel,
            reply_queue,
            waiting,
        })
    }

    async fn place(&self, order: &Order, key: &str) -> Value {
        let body = serde_json::to_vec(&order.dict()).unwrap_or_default();
        loop {
            let (tx, rx) = oneshot::channel();
            self.waiting.lock().await.insert(key.to_owned(), tx);
            let props = BasicProperties::default()
                .with_message_id(key.into())
                .with_correlation_id(key.into())
                .with_reply_to(self.reply_queue.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            let published = async {
                self.channel
                    .basic_publish(
                        EXCHANGE.into(),
                        "order.requested".into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await?
                    .await
            };
            if published.await.is_ok()
                && let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(30), rx).await
            {
                return v;
            }
            self.waiting.lock().await.remove(key);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Places `orders` (keys `<run>-<index>`) under `load`; one sample each, in
/// completion order.
pub async fn drive(
    client: &Client,
    run: &str,
    orders: Vec<Order>,
    load: Load,
    progress: &ProgressBar,
) -> Vec<Sample> {
    let samples = Arc::new(Mutex::new(Vec::with_capacity(orders.len())));
    let orders = Arc::new(orders);
    let t0 = Instant::now();
    match load {
        Load::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..concurrency.max(1))
                .map(|_| {
                    let (client, orders, next, samples, progress, run) = (
                        client.clone(),
                        orders.clone(),
                        next.clone(),
                        samples.clone(),
                        progress.clone(),
                        run.to_owned(),
                    );
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(order) = orders.get(i) else { return };
                            let started = t0.elapsed();
                            let sample = one(&client, &run, order, started, Instant::now()).await;
                            samples.lock().await.push(sample);
                            progress.inc(1);
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.await;
            }
        }
        Load::Open { rate } => {
            // Bounded, so an overloaded system cannot exhaust the driver;
            // waiting for a permit counts in the latency.
            let permits = Arc::new(Semaphore::new(16_384));
            let mut tasks = Vec::with_capacity(orders.len());
            for i in 0..orders.len() {
                let due = Duration::from_secs_f64(i as f64 / rate.max(0.001));
                tokio::time::sleep_until(t0 + due).await;
                let (client, orders, samples, progress, permits, run) = (
                    client.clone(),
                    orders.clone(),
                    samples.clone(),
                    progress.clone(),
                    permits.clone(),
                    run.to_owned(),
                );
                tasks.push(tokio::spawn(async move {
                    let _permit = permits.acquire().await;
                    let sample = one(&client, &run, &orders[i], due, t0 + due).await;
                    samples.lock().await.push(sample);
                    progress.inc(1);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    Arc::try_unwrap(samples)
        .map(Mutex::into_inner)
        .unwrap_or_default()
}

async fn one(
    client: &Client,
    run: &str,
    order: &Order,
    started: Duration,
    since: Instant,
) -> Sample {
    let key = format!("{run}-{}", order.index);
    let result = client.place(order, &key).await;
    Sample {
        order: order.clone(),
        key,
        started,
        latency: since.elapsed(),
        result,
    }
}
