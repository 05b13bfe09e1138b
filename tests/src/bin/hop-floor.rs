//! The floor of the design on a machine: what five durable hops cost with
//! no business at all.
//!
//! Each stage is a process that does the least a choreographed saga's step
//! can do: take a delivery, commit one row in its own PostgreSQL database
//! (`synchronous_commit` as the server has it), publish the next event
//! persistently to a quorum queue, ack. One message per transaction, each
//! handled as soon as it arrives (a task per delivery: no stage waits for
//! another message's commit). Five stages, as on the saga's path
//! (placement, charge, reservation, email, decision): the first is entered
//! by a transient message (what an HTTP request is to order-svc), the last
//! answers on a transient queue (the HTTP answer).
//!
//! Open loop at each `--rates` rate, latency counted from each order's
//! scheduled start; CPU from `/proc` per order: the whole machine's, and
//! PostgreSQL's, RabbitMQ's and the stages' own. One JSON line per rate.
//!
//! ```text
//! hop-floor --rates 100,250,500 --orders 3000
//! ```
//!
//! What the saga costs above this floor is its business; what the floor
//! costs is the machine's price for the design (docs/benchmarks.md, "The
//! floor of five durable hops"). It makes databases `hopfloor_<run>_<k>`
//! and queues `hopfloor.<run>.*` on `AMQP_URL`'s vhost, and removes them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use saga_tests::bench::measure;
use serde_json::json;
use sqlx::Connection as _;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    name = "hop-floor",
    about = "Latency and CPU of bare durable hops: the design's floor on this machine"
)]
struct Args {
    /// Open-loop rates to measure, orders per second.
    #[arg(long, value_delimiter = ',', default_value = "100,250")]
    rates: Vec<f64>,
    /// Orders measured at each rate (after a warm-up of a tenth).
    #[arg(long, short = 'n', default_value_t = 3000)]
    orders: usize,
    /// Stages (processes) on an order's path.
    #[arg(long, default_value_t = 5)]
    stages: usize,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The PostgreSQL server, without a database name (a role that may
    /// create databases).
    #[arg(long, env = "PG_URL", default_value = "postgres://root@127.0.0.1:5432")]
    pg_url: String,
    /// Internal: run stage K of run --run.
    #[arg(long, hide = true)]
    stage: Option<usize>,
    #[arg(long, hide = true)]
    run: Option<String>,
}

/// How long the driver waits for an order that does not come back.
const LOST_AFTER: Duration = Duration::from_secs(30);

fn queue(run: &str, stage: usize) -> String {
    format!("hopfloor.{run}.{stage}")
}

fn answers_queue(run: &str) -> String {
    format!("hopfloor.{run}.answers")
}

fn database(run: &str, stage: usize) -> String {
    format!("hopfloor_{run}_{stage}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.stages == 0
        || args.orders == 0
        || args.rates.iter().any(|r| !(r.is_finite() && *r > 0.0))
    {
        bail!("--stages, --orders and every rate must be positive (and finite)");
    }
    match (args.stage, args.run.clone()) {
        (Some(stage), Some(run)) => run_stage(&args, &run, stage).await,
        _ => drive(&args).await,
    }
}

/// One stage: take a delivery, commit a row, publish the next hop, ack.
/// Any failure ends the process (the driver then reports orders lost).
async fn run_stage(args: &Args, run: &str, stage: usize) -> Result<()> {
    let db = PgPoolOptions::new()
        .max_connections(8)
        .min_connections(2)
        .test_before_acquire(false)
        .connect(&format!("{}/{}", args.pg_url, database(run, stage)))
        .await?;
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let consume = conn.create_channel().await?;
    consume.basic_qos(256, BasicQosOptions::default()).await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let last = stage + 1 == args.stages;
    let next: Arc<str> = if last {
        answers_queue(run).into()
    } else {
        queue(run, stage + 1).into()
    };
    let mut deliveries = consume
        .basic_consume(
            queue(run, stage).as_str().into(),
            format!("stage-{stage}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let (db, publish, next) = (db.clone(), publish.clone(), next.clone());
        tokio::spawn(async move {
            let hop = async {
                let id = Uuid::from_slice(&delivery.data).context("a message without an id")?;
                let mut tx = db.begin().await?;
                sqlx::query("insert into steps (id) values ($1) on conflict do nothing")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                let properties = if last {
                    BasicProperties::default()
                } else {
                    BasicProperties::default().with_delivery_mode(2)
                };
                let confirm = publish
                    .basic_publish(
                        "".into(),
                        next.as_ref().into(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        properties,
                    )
                    .await?;
                delivery.ack(BasicAckOptions::default()).await?;
                confirm.await?;
                anyhow::Ok(())
            };
            if let Err(error) = hop.await {
                eprintln!("hop-floor stage {stage}: {error:#}");
                std::process::exit(1);
            }
        });
    }
    Ok(())
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t
}

/// Sets up the run's databases and queues, starts the stages, measures,
/// and removes everything it made (also when the measurement failed).
async fn drive(args: &Args) -> Result<()> {
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to AMQP_URL")?;
    let channel = conn.create_channel().await?;
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", args.pg_url))
        .await
        .context("connecting to PG_URL")?;
    let mut children = Vec::new();
    let result = async {
        for stage in 0..args.stages {
            let name = database(&run, stage);
            sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
                .execute(&mut admin)
                .await?;
            let mut db = sqlx::PgConnection::connect(&format!("{}/{name}", args.pg_url)).await?;
            sqlx::query("create table steps (id uuid primary key)")
                .execute(&mut db)
                .await?;
            db.close().await?;
            // The entry is transient, like an HTTP request; every hop
            // after it is durable.
            let durable = stage > 0;
            channel
                .queue_declare(
                    queue(&run, stage).as_str().into(),
                    QueueDeclareOptions {
                        durable,
                        ..QueueDeclareOptions::default()
                    },
                    if durable {
                        quorum()
                    } else {
                        FieldTable::default()
                    },
                )
                .await?;
        }
        channel
            .queue_declare(
                answers_queue(&run).as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let exe = std::env::current_exe()?;
        for stage in 0..args.stages {
            children.push(
                tokio::process::Command::new(&exe)
                    .args(["--stage", &stage.to_string(), "--run", &run])
                    .args(["--stages", &args.stages.to_string()])
                    .args(["--amqp-url", &args.amqp_url, "--pg-url", &args.pg_url])
                    .kill_on_drop(true)
                    .spawn()?,
            );
        }
        measure(args, &run, &conn).await
    }
    .await;
    for mut child in children {
        let _ = child.kill().await;
    }
    for stage in 0..args.stages {
        let _ = channel
            .queue_delete(
                queue(&run, stage).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists {} with (force)",
            database(&run, stage)
        )))
        .execute(&mut admin)
        .await;
    }
    let _ = channel
        .queue_delete(
            answers_queue(&run).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "done".into()).await;
    result
}

/// Waits until every stage consumes its queue.
async fn wait_for_stages(channel: &Channel, run: &str, stages: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for stage in 0..stages {
        loop {
            let q = channel
                .queue_declare(
                    queue(run, stage).as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            if q.consumer_count() > 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("stage {stage} did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

async fn measure(args: &Args, run: &str, conn: &Connection) -> Result<()> {
    let started: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let answers = conn.create_channel().await?;
    let mut answered = answers
        .basic_consume(
            answers_queue(run).as_str().into(),
            "driver".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let waiting = started.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = answered.next().await {
            let Ok(id) = Uuid::from_slice(&delivery.data) else {
                continue;
            };
            let start = waiting.lock().expect("not poisoned").remove(&id);
            if let Some(start) = start {
                let _ = done_tx.send(start.elapsed());
            }
        }
    });
    let requests = conn.create_channel().await?;
    wait_for_stages(&requests, run, args.stages).await?;

    for &rate in &args.rates {
        let warmup = args.orders / 10;
        let total = warmup + args.orders;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let begin = Instant::now();
        let mut cpu_start = None;
        let mut latencies = Vec::with_capacity(args.orders);
        let (mut sent, mut received) = (0, 0);
        while received < total {
            let answer = if sent < total {
                let at = begin + interval.mul_f64(sent as f64);
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {
                        if sent == warmup {
                            cpu_start = Some(Cpu::now());
                        }
                        let id = Uuid::new_v4();
                        started.lock().expect("not poisoned").insert(id, at);
                        requests
                            .basic_publish(
                                "".into(),
                                queue(run, 0).as_str().into(),
                                BasicPublishOptions::default(),
                                id.as_bytes(),
                                BasicProperties::default(),
                            )
                            .await?;
                        sent += 1;
                        continue;
                    }
                    answer = done_rx.recv() => answer,
                }
            } else {
                tokio::time::timeout(LOST_AFTER, done_rx.recv())
                    .await
                    .with_context(|| format!("{} orders lost", total - received))?
            };
            let latency = answer.context("the answers' consumer stopped")?;
            received += 1;
            if received > warmup {
                latencies.push(latency);
            }
        }
        let cpu = Cpu::now().since(&cpu_start.unwrap_or_else(Cpu::now), args.orders);
        latencies.sort();
        let ms = |q: f64| {
            let i = ((latencies.len() as f64 * q) as usize).min(latencies.len() - 1);
            (latencies[i].as_secs_f64() * 1e4).round() / 10.0
        };
        println!(
            "{}",
            json!({
                "system": "hop-floor",
                "stages": args.stages,
                "rate": rate,
                "n": args.orders,
                "p50_ms": ms(0.5),
                "p95_ms": ms(0.95),
                "p99_ms": ms(0.99),
                "cpu_ms_per_order": cpu.machine,
                "cpu_ms_per_order_by_component": {
                    "postgresql": cpu.postgresql,
                    "rabbitmq": cpu.rabbitmq,
                    "stages": cpu.stages,
                },
            })
        );
        // Let the machine settle between rates.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// CPU used so far, in seconds: the whole machine's (busy time, from
/// `/proc/stat`) and PostgreSQL's, RabbitMQ's and the stages' processes'
/// (not the driver's).
struct Cpu {
    machine: f64,
    postgresql: f64,
    rabbitmq: f64,
    stages: f64,
}

/// What `/proc/stat` counts in: `USER_HZ`.
const TICKS_PER_SEC: f64 = 100.0;

impl Cpu {
    fn now() -> Cpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal...: busy is all
        // but idle and iowait.
        let idle = ticks.get(3).unwrap_or(&0.0) + ticks.get(4).unwrap_or(&0.0);
        let mut cpu = Cpu {
            machine: (ticks.iter().sum::<f64>() - idle) / TICKS_PER_SEC,
            postgresql: 0.0,
            rabbitmq: 0.0,
            stages: 0.0,
        };
        let driver = std::process::id();
        for (pid, comm, used) in measure::processes() {
            let slot = match comm.as_str() {
                _ if pid == driver => continue,
                "postgres" => &mut cpu.postgresql,
                "beam.smp" => &mut cpu.rabbitmq,
                "hop-floor" => &mut cpu.stages,
                _ => continue,
            };
            *slot += used;
        }
        cpu
    }

    /// Milliseconds per order since `start`.
    fn since(&self, start: &Cpu, orders: usize) -> Cpu {
        let per = |now: f64, then: f64| {
            ((now - then).max(0.0) * 1000.0 / orders as f64 * 100.0).round() / 100.0
        };
        Cpu {
            machine: per(self.machine, start.machine),
            postgresql: per(self.postgresql, start.postgresql),
            rabbitmq: per(self.rabbitmq, start.rabbitmq),
            stages: per(self.stages, start.stages),
        }
    }
}
