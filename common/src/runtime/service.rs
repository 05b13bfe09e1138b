//! The wiring every service shares: database, broker supervisor, the
//! outbox's publisher, janitor and sweeper, the consumer, the HTTP server,
//! background tasks, and an orderly shutdown.
//!
//! A service's `main` is: parse config, [`ServiceRuntime::build`], build its
//! handler and routes on the runtime's pool and publisher, then
//! [`ServiceRuntime::run`].
//!
//! Shutdown (on the token passed to `run`) happens in phases, so nothing in
//! flight is lost:
//! 1. stop intake: the HTTP server stops accepting and drains — while the
//!    consumer and the intake tasks still run, so a request waiting for a
//!    saga's decision (order-svc) gets it even from a lone replica; then the
//!    consumer finishes the batch in hand (commit, ack) and the intake tasks
//!    (timeout watcher) stop;
//! 2. support tasks that intake relied on (order-svc's placement batcher)
//!    finish what is queued;
//! 3. flush: the publisher sends what was committed and waits for its
//!    confirms, the janitor deletes the confirmed rows, the sweeper
//!    publishes whatever is left;
//! 4. close the broker connection and the pool.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use futures_util::future::BoxFuture;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::{Level, info, warn};
use utoipa_axum::router::OpenApiRouter;

use crate::messaging::broker::Broker;
use crate::messaging::consumer::{Consumer, ConsumerSettings};
use crate::messaging::handler::MessageHandler;
use crate::messaging::outbox::{Confirmed, Janitor, OutboxSettings, Sweeper};
use crate::messaging::publisher::{Publisher, PublisherTask};
use crate::messaging::retry;
use crate::messaging::topology::ServiceIdentity;
use crate::messaging::trust::ProducerTrust;
use crate::runtime::auth::HttpAuth;
use crate::runtime::config::{CommonConfig, redact_url};
use crate::runtime::{auth, http, openapi, telemetry, traces};
use crate::store::{gauges, pool as db, retention, statistics};

/// A task that runs until its token is cancelled.
pub type BackgroundTask = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// A service's own tasks, by shutdown phase.
#[derive(Default)]
pub struct Tasks {
    /// Stopped with the intake (phase 1): e.g. the timeout watcher.
    pub intake: Vec<BackgroundTask>,
    /// Stopped once the intake has drained (phase 2): what intake handlers
    /// wait on, e.g. a batcher of HTTP requests.
    pub support: Vec<BackgroundTask>,
}

/// A service's infrastructure, ready to run.
pub struct ServiceRuntime {
    pub identity: ServiceIdentity,
    pub config: CommonConfig,
    pub pool: PgPool,
    pub broker: Broker,
    /// The outbox's fast path: hand it what a commit wrote.
    pub publisher: Publisher,
    /// Which broker user may publish which event.
    pub trust: ProducerTrust,
    auth: HttpAuth,
    publisher_task: PublisherTask,
    confirmed: Confirmed,
    listener: TcpListener,
}

impl ServiceRuntime {
    /// Creates and migrates the database, binds the HTTP port. Spawns nothing.
    pub async fn build(
        identity: ServiceIdentity,
        config: CommonConfig,
        migrations: &Migrator,
    ) -> anyhow::Result<Self> {
        retry::check_window(config.retention(), config.retry_max_attempts)?;
        let trust = config.producer_trust().map_err(anyhow::Error::msg)?;
        let auth = config.http_auth().map_err(anyhow::Error::msg)?;
        if !auth.enabled() && !config.dev_mode {
            anyhow::bail!(
                "API_TOKEN and ADMIN_TOKEN are not set: without them the HTTP API would be open to \
                 anyone who can reach {}; set both (see docs/security.md), or DEV_MODE=1 on a \
                 development machine",
                config.http_addr(&identity)
            );
        }
        if !auth.enabled() {
            warn!(
                "API_TOKEN and ADMIN_TOKEN are not set: the HTTP API is OPEN to anyone who can \
                 reach {}; set both tokens anywhere but on a development machine",
                config.http_addr(&identity)
            );
        }
        let database_url = config.database_url(&identity);
        let pool = db::connect_and_migrate(&database_url, config.db_pool_size, migrations)
            .await
            .with_context(|| format!("preparing database {}", redact_url(&database_url)))?;
        let addr = config.http_addr(&identity);
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding HTTP on {addr}"))?;
        let connection_name = format!("{}@{}", identity.name, std::process::id());
        let broker = Broker::new(config.amqp_url.clone(), connection_name, config.queue_type);
        let confirmed = Confirmed::default();
        let (publisher, publisher_task) =
            Publisher::new(identity.name, broker.clone(), confirmed.clone());
        // Register the recorder before anything records.
        let _ = telemetry::prometheus();
        if let Some(endpoint) = &config.otel_exporter_otlp_endpoint {
            let protocol = traces::protocol(&config.otel_exporter_otlp_protocol)
                .map_err(anyhow::Error::msg)?;
            traces::install(identity.name, endpoint, protocol)
                .context("setting up the OTLP trace export")?;
            info!(endpoint = %redact_url(endpoint), "exporting traces over OTLP");
        }
        Ok(Self {
            identity,
            config,
            pool,
            broker,
            publisher,
            trust,
            auth,
            publisher_task,
            confirmed,
            listener,
        })
    }

    /// The bound HTTP address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address") // startup invariant
    }

    /// Runs everything until `cancel` fires, then shuts down in phases.
    pub async fn run<H: MessageHandler>(
        self,
        handler: H,
        routes: OpenApiRouter,
        tasks: Tasks,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let name = self.identity.name;
        let grace = self.config.shutdown_grace();
        let http_stop = CancellationToken::new();
        let intake = CancellationToken::new();
        let support = CancellationToken::new();
        let flush = CancellationToken::new();
        let infra_stop = CancellationToken::new();

        let infra = TaskTracker::new();
        infra.spawn(self.broker.clone().supervise(infra_stop.clone()));
        infra.spawn(telemetry::run_upkeep(infra_stop.clone()));
        infra.spawn(gauges::run(name, self.pool.clone(), infra_stop.clone()));
        infra.spawn(statistics::run(name, self.pool.clone(), infra_stop.clone()));
        infra.spawn(retention::run_cleaner(
            name,
            self.pool.clone(),
            self.config.retention(),
            Duration::from_secs(self.config.cleanup_interval_secs),
            infra_stop.clone(),
        ));

        // The outbox: fast path, janitor, sweeper.
        let publisher_task = tokio::spawn(self.publisher_task.run(flush.clone()));
        let janitor_stop = CancellationToken::new();
        let janitor = tokio::spawn(
            Janitor::new(self.pool.clone(), self.confirmed.clone()).run(janitor_stop.clone()),
        );
        let sweeper_stop = CancellationToken::new();
        let sweeper = tokio::spawn(
            Sweeper::new(
                name,
                self.pool.clone(),
                self.broker.clone(),
                OutboxSettings {
                    batch_size: self.config.outbox_batch_size,
                    sweep_interval: Duration::from_millis(self.config.outbox_poll_ms),
                    sweep_after: Duration::from_millis(self.config.outbox_sweep_after_ms),
                },
            )
            .run(sweeper_stop.clone()),
        );

        let support_tasks = TaskTracker::new();
        for task in tasks.support {
            support_tasks.spawn(task(support.clone()));
        }

        let intake_tasks = TaskTracker::new();
        let consumer = Consumer::new(
            self.identity,
            self.broker.clone(),
            self.pool.clone(),
            self.publisher.clone(),
            ConsumerSettings {
                prefetch: self.config.prefetch,
                batch_size: self.config.batch_size,
                max_attempts: self.config.retry_max_attempts,
                fault_delay: self.config.fault_delay_ms,
                replay_window: self.config.retention(),
                handler_timeout: Duration::from_millis(self.config.handler_timeout_ms),
                trust: self.trust.clone(),
            },
            Arc::new(handler),
        );
        intake_tasks.spawn(consumer.run(intake.clone()));
        for task in tasks.intake {
            intake_tasks.spawn(task(intake.clone()));
        }

        let (routes, own) = routes.split_for_parts();
        let document = openapi::service_document(name, own);
        let shared = openapi::shared_routes(
            http::OpsState {
                service: self.identity,
                broker: self.broker.clone(),
                pool: self.pool.clone(),
                auth_enabled: self.auth.enabled(),
                dev_mode: self.config.dev_mode,
            },
            &document,
        )?;
        let router: Router = routes
            .merge(shared)
            // Innermost first: the body limit, JSON only, a token, then
            // (outer) the in-flight bound and the timeout, so even a refused
            // request counts against neither for long.
            .layer(DefaultBodyLimit::max(http::MAX_REQUEST_BODY_BYTES))
            .layer(axum::middleware::from_fn(http::require_json))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(self.auth),
                auth::require_token,
            ))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(self.config.http_request_timeout_ms),
            ))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(Semaphore::new(self.config.http_max_in_flight.max(1))),
                http::limit_in_flight,
            ))
            .layer(axum::middleware::from_fn_with_state(
                name,
                http::track_metrics,
            ))
            .layer(CatchPanicLayer::new())
            .layer(axum::middleware::from_fn(http::errors_as_json))
            .layer(axum::middleware::from_fn(http::failure_dicts))
            // 503s are expected while a dependency is down (readiness):
            // warnings, not errors.
            .layer(
                TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::WARN)),
            );
        let server = crate::runtime::server::serve(
            self.listener,
            router,
            Duration::from_millis(self.config.http_header_timeout_ms),
            http_stop.clone(),
        );
        let mut http_task = tokio::spawn(server);
        info!(service = name, "started");

        let http_failure = tokio::select! {
            _ = cancel.cancelled() => None,
            r = &mut http_task => Some(r),
        };

        info!(service = name, "stopping intake");
        http_stop.cancel();
        if http_failure.is_none() && tokio::time::timeout(grace, &mut http_task).await.is_err() {
            warn!(
                service = name,
                "HTTP requests did not drain within the grace period"
            );
        }
        intake.cancel();
        intake_tasks.close();
        if tokio::time::timeout(grace, intake_tasks.wait())
            .await
            .is_err()
        {
            warn!(
                service = name,
                "intake did not drain within the grace period"
            );
        }
        support.cancel();
        support_tasks.close();
        if tokio::time::timeout(grace, support_tasks.wait())
            .await
            .is_err()
        {
            warn!(
                service = name,
                "support tasks did not stop within the grace period"
            );
        }

        info!(service = name, "flushing the outbox");
        flush.cancel();
        let _ = tokio::time::timeout(grace, publisher_task).await;
        janitor_stop.cancel();
        let _ = tokio::time::timeout(grace, janitor).await;
        sweeper_stop.cancel();
        if tokio::time::timeout(grace, sweeper).await.is_err() {
            warn!(
                service = name,
                "outbox flush did not finish within the grace period"
            );
        }

        infra_stop.cancel();
        infra.close();
        infra.wait().await;
        self.pool.close().await;
        // Sends the spans not sent yet (the SDK's exporter blocks).
        let _ = tokio::task::spawn_blocking(move || traces::shutdown(name)).await;
        info!(service = name, "stopped");

        match http_failure {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(anyhow::Error::from(e).context("HTTP server failed")),
            Some(Err(e)) => Err(anyhow::Error::from(e).context("HTTP server panicked")),
        }
    }
}

/// A runnable service: how `main` and the tests start one.
pub trait Service: Sized + Send + 'static {
    /// The service's configuration (flags and environment).
    type Config: clap::Parser + Send + 'static;

    /// Fallible set-up: database, migrations, HTTP port. Spawns nothing.
    fn build(config: Self::Config) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// The bound HTTP address.
    fn local_addr(&self) -> SocketAddr;

    /// Runs until `cancel` fires, then drains and returns.
    fn run(self, cancel: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The whole of a service binary's `main`: parse the configuration, start
/// the runtime, build, run until SIGTERM or ctrl-c.
pub fn main<S: Service>() -> anyhow::Result<()> {
    main_with::<S>(<S::Config as clap::Parser>::parse())
}

/// [`main`] with an already parsed configuration.
pub fn main_with<S: Service>(config: S::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let _failpoints = crate::failpoints::setup();
    let result = runtime.block_on(async move {
        telemetry::init_tracing();
        let app = S::build(config).await?;
        info!(addr = %app.local_addr(), "listening");
        app.run(crate::runtime::shutdown::on_signal()).await
    });
    // Everything that matters has drained by now; don't let a blocking
    // thread (a client's I/O loop stuck on a dead socket) hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match &result {
        Ok(()) => info!("exiting"),
        Err(e) => tracing::error!(error = format!("{e:#}"), "exiting after a failure"),
    }
    result
}
