//! Test harness: the whole saga, in-process, against the real RabbitMQ and
//! PostgreSQL, isolated per test.
//!
//! [`TestSystem::spawn`] gives each test its own RabbitMQ vhost and its own
//! four databases (names start with `st_<unix time>_`), starts the four
//! services on ephemeral ports, and removes everything when the test ends
//! (also when it panics; a process killed outright leaves names that the next
//! run sweeps once they are an hour old). Tests therefore run in parallel.
//!
//! The broker and database are located through `TEST_AMQP_BASE`
//! (`amqp://guest:guest@127.0.0.1:5672`), `TEST_RABBITMQ_MGMT`
//! (`http://127.0.0.1:15672`, user guest/guest) and `TEST_PG_BASE`
//! (`postgres://postgres@127.0.0.1:5432`). If they are not reachable the
//! tests fail loudly: start them with `scripts/dev-up.sh`.

pub mod bench;
pub mod invariants;
pub mod openapi;
pub mod process;
pub mod publisher;
pub mod smtp;

use std::future::Future;
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::messaging::permissions::Permissions;
use common::messaging::topology::{self, ServiceIdentity};
use common::messaging::trust::amqp_user;
use common::runtime::config::CommonConfig;
use common::runtime::service::Service;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use common::messaging::events::EXCHANGE;

/// One of the four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Svc {
    Order,
    Payment,
    Inventory,
    Notification,
}

impl Svc {
    pub const ALL: [Svc; 4] = [Svc::Order, Svc::Payment, Svc::Inventory, Svc::Notification];

    pub fn identity(self) -> ServiceIdentity {
        match self {
            Svc::Order => topology::ORDER_SVC,
            Svc::Payment => topology::PAYMENT_SVC,
            Svc::Inventory => topology::INVENTORY_SVC,
            Svc::Notification => topology::NOTIFICATION_SVC,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// A broker cluster the tests of this process use instead of the local
/// RabbitMQ: its nodes' AMQP bases and one management API.
static CLUSTER: std::sync::OnceLock<(Vec<String>, String)> = std::sync::OnceLock::new();

/// Makes every sandbox of this process live on a RabbitMQ cluster
/// (`scripts/cluster-up.sh`): its vhost made through `mgmt`, the services
/// given every node (`AMQP_URL` as a list), the test's own connections the
/// first node. Call before the first sandbox; a test binary of its own.
pub fn use_broker_cluster(amqp_bases: Vec<String>, mgmt: String) {
    let _ = CLUSTER.set((amqp_bases, mgmt));
}

fn amqp_bases() -> Vec<String> {
    CLUSTER.get().map_or_else(
        || {
            vec![env_or(
                "TEST_AMQP_BASE",
                "amqp://guest:guest@127.0.0.1:5672",
            )]
        },
        |(bases, _)| bases.clone(),
    )
}

pub fn amqp_base() -> String {
    amqp_bases().swap_remove(0)
}

/// The management API of the broker (or cluster) the sandboxes live on.
pub fn broker_mgmt_url() -> String {
    mgmt_base()
}

fn mgmt_base() -> String {
    CLUSTER.get().map_or_else(
        || env_or("TEST_RABBITMQ_MGMT", "http://127.0.0.1:15672"),
        |(_, mgmt)| mgmt.clone(),
    )
}

/// The PostgreSQL server the sandboxes' databases live on, without a
/// database name (a role that may create databases).
pub fn pg_base() -> String {
    env_or("TEST_PG_BASE", "postgres://postgres@127.0.0.1:5432")
}

/// How to start a test system.
#[derive(Debug, Clone)]
pub struct Options {
    pub deadline_ms: u64,
    /// order-svc's `SAGA_LONG_DEADLINE_MS` (unset: its default).
    pub long_deadline_ms: Option<u64>,
    /// inventory-svc's `HOLD_EXPIRY_GRACE_MS` (unset: its default).
    pub hold_expiry_grace_ms: Option<u64>,
    /// `AMQP_URL` lists a node where nothing listens before the real one.
    pub dead_broker_node_first: bool,
    /// `DATABASE_URL` lists a host where nothing listens before the real one.
    pub dead_database_host_first: bool,
    pub fault_delay: [Option<String>; 4],
    pub start: [bool; 4],
    pub pool_size: u32,
    pub retry_max_attempts: u32,
    pub handler_timeout_ms: u64,
    /// notification-svc's `SMTP_URL` (unset: the log transport).
    pub smtp_url: Option<String>,
    /// `API_TOKEN` and `ADMIN_TOKEN` (unset: the HTTP API is open). The
    /// harness's own requests carry the admin token.
    pub tokens: Option<Tokens>,
    /// `API_CLIENTS`, with `tokens`.
    pub api_clients: Option<String>,
    /// Each service connects as a broker user of its own, and every service
    /// is told which (`PRODUCER_USERS`); unset: one shared user.
    pub broker_user_per_service: bool,
    /// Those users have only the permissions they need.
    pub confined_broker_users: bool,
    /// `HTTP_HEADER_TIMEOUT_MS` (unset: the default).
    pub http_header_timeout_ms: Option<u64>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, with the `http/json` protocol (unset:
    /// no trace export).
    pub otlp_endpoint: Option<String>,
}

/// The HTTP API's bearer tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub api: String,
    pub admin: String,
}

impl Tokens {
    /// Two fresh random tokens.
    pub fn random() -> Tokens {
        Tokens {
            api: format!("api-{}", Uuid::new_v4().simple()),
            admin: format!("admin-{}", Uuid::new_v4().simple()),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            deadline_ms: 5000,
            fault_delay: Default::default(),
            start: [true; 4],
            pool_size: 4,
            retry_max_attempts: 8,
            handler_timeout_ms: 30_000,
            smtp_url: None,
            tokens: None,
            api_clients: None,
            broker_user_per_service: false,
            confined_broker_users: false,
            http_header_timeout_ms: None,
            otlp_endpoint: None,
            long_deadline_ms: None,
            hold_expiry_grace_ms: None,
            dead_broker_node_first: false,
            dead_database_host_first: false,
        }
    }
}

impl Options {
    pub fn deadline_ms(mut self, ms: u64) -> Self {
        self.deadline_ms = ms;
        self
    }

    /// `FAULT_DELAY_MS` for one service (`"300"` or `"50-300"`).
    pub fn fault_delay(mut self, svc: Svc, delay: &str) -> Self {
        self.fault_delay[svc.index()] = Some(delay.to_owned());
        self
    }

    /// Do not start this service (it can be started later).
    pub fn without(mut self, svc: Svc) -> Self {
        self.start[svc.index()] = false;
        self
    }

    pub fn pool_size(mut self, n: u32) -> Self {
        self.pool_size = n;
        self
    }

    pub fn retry_max_attempts(mut self, n: u32) -> Self {
        self.retry_max_attempts = n;
        self
    }

    pub fn handler_timeout_ms(mut self, ms: u64) -> Self {
        self.handler_timeout_ms = ms;
        self
    }

    /// Each service connects as its own broker user (see
    /// [`TestSystem::broker_url`]), with full permissions on the vhost (to
    /// test what the services check themselves).
    pub fn broker_user_per_service(mut self) -> Self {
        self.broker_user_per_service = true;
        self
    }

    /// Each service connects as its own broker user, confined to what it
    /// needs ([`common::messaging::permissions`]); the topology is declared
    /// first by an administrator, as `sagactl broker setup` does.
    pub fn confined_broker_users(mut self) -> Self {
        self.broker_user_per_service = true;
        self.confined_broker_users = true;
        self
    }

    /// The services close a connection whose request head takes longer.
    pub fn http_header_timeout_ms(mut self, ms: u64) -> Self {
        self.http_header_timeout_ms = Some(ms);
        self
    }

    /// order-svc's long deadline (sagas waiting for a 3-D Secure answer).
    pub fn long_deadline_ms(mut self, ms: u64) -> Self {
        self.long_deadline_ms = Some(ms);
        self
    }

    /// Every service's `AMQP_URL` lists a dead node first (a cluster node
    /// down): they must fail over to the live one.
    pub fn dead_broker_node_first(mut self) -> Self {
        self.dead_broker_node_first = true;
        self
    }

    /// Every service's `DATABASE_URL` lists a dead host first (a standby
    /// gone): they must find the writable one.
    pub fn dead_database_host_first(mut self) -> Self {
        self.dead_database_host_first = true;
        self
    }

    /// inventory-svc releases expired holds this long after their expiry.
    pub fn hold_expiry_grace_ms(mut self, ms: u64) -> Self {
        self.hold_expiry_grace_ms = Some(ms);
        self
    }

    /// Every service exports its spans to this OTLP/HTTP collector (JSON).
    pub fn otlp_endpoint(mut self, url: &str) -> Self {
        self.otlp_endpoint = Some(url.to_owned());
        self
    }

    /// Named API clients besides (`API_CLIENTS`: `name=token,…`).
    pub fn api_clients(mut self, spec: &str) -> Self {
        self.api_clients = Some(spec.to_owned());
        self
    }

    /// The services require these bearer tokens.
    pub fn tokens(mut self, tokens: Tokens) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// notification-svc hands its emails to this SMTP relay.
    pub fn smtp_url(mut self, url: &str) -> Self {
        self.smtp_url = Some(url.to_owned());
        self
    }

    pub async fn spawn(self) -> TestSystem {
        TestSystem::spawn_with(self).await
    }
}

struct Running {
    base_url: String,
    cancel: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// One test's own RabbitMQ vhost and PostgreSQL databases, removed when it
/// is dropped (or closed).
pub struct Sandbox {
    /// `st_<unix time>_<8 hex>`: the vhost, and the databases' prefix.
    pub prefix: String,
    /// The test's own connections' AMQP URL (the first node's).
    pub amqp_url: String,
    /// What the services get as `AMQP_URL`: every node (one, unless on a
    /// cluster: [`use_broker_cluster`]).
    pub amqp_nodes: String,
    pub http: reqwest::Client,
    cleaned: bool,
}

impl Sandbox {
    pub async fn new() -> Sandbox {
        init_test_logging();
        sweep_stale_resources().await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let prefix = format!("st_{now}_{}", &Uuid::new_v4().simple().to_string()[..8]);
        create_vhost(&prefix).await;
        Sandbox {
            amqp_url: format!("{}/{prefix}", amqp_base()),
            amqp_nodes: amqp_bases()
                .iter()
                .map(|base| format!("{base}/{prefix}"))
                .collect::<Vec<_>>()
                .join(","),
            prefix,
            http: reqwest::Client::new(),
            cleaned: false,
        }
    }

    /// The URL of a service's own database.
    pub fn database_url(&self, svc: Svc) -> String {
        format!("{}/{}_{}", pg_base(), self.prefix, svc.identity().database)
    }

    /// A broker user of its own (`<prefix>_<name>`), with full permissions
    /// on this sandbox's vhost — not one of the services' users; returns
    /// its AMQP URL. Removed with the sandbox.
    pub async fn broker_user(&self, name: &str) -> (String, String) {
        self.broker_user_with(name, None).await
    }

    /// A broker user of its own with `permissions` (full ones if `None`)
    /// on this sandbox's vhost; returns its name and AMQP URL.
    pub async fn broker_user_with(
        &self,
        name: &str,
        permissions: Option<&Permissions>,
    ) -> (String, String) {
        let user = format!("{}_{name}", self.prefix);
        let password = Uuid::new_v4().simple().to_string();
        let base = mgmt_base();
        let r = mgmt(self.http.put(format!("{base}/api/users/{user}")))
            .json(&json!({"password": password, "tags": ""}))
            .send()
            .await
            .expect("create broker user");
        assert!(
            r.status().is_success(),
            "creating user {user}: {}",
            r.status()
        );
        let r = mgmt(
            self.http
                .put(format!("{base}/api/permissions/{}/{user}", self.prefix)),
        )
        .json(&permissions.map_or_else(
            || json!({"configure": ".*", "write": ".*", "read": ".*"}),
            |p| json!({"configure": p.configure, "write": p.write, "read": p.read}),
        ))
        .send()
        .await
        .expect("set user permissions");
        assert!(r.status().is_success(), "user permissions: {}", r.status());
        for topic in permissions.map(|p| p.topics.as_slice()).unwrap_or_default() {
            let r = mgmt(self.http.put(format!(
                "{base}/api/topic-permissions/{}/{user}",
                self.prefix
            )))
            .json(&json!({"exchange": topic.exchange, "write": topic.write, "read": topic.read}))
            .send()
            .await
            .expect("set topic permissions");
            assert!(r.status().is_success(), "topic permissions: {}", r.status());
        }
        let host = amqp_base()
            .split_once('@')
            .map_or_else(|| "127.0.0.1:5672".to_owned(), |(_, h)| h.to_owned());
        let url = format!("amqp://{user}:{password}@{host}/{}", self.prefix);
        (user, url)
    }

    /// The names of the queues in this sandbox's vhost.
    pub async fn queue_names(&self) -> Vec<String> {
        let queues: Vec<Value> = mgmt(self.http.get(format!(
            "{}/api/queues/{}",
            mgmt_base(),
            self.prefix
        )))
        .send()
        .await
        .expect("list queues")
        .json()
        .await
        .expect("queue list");
        queues
            .iter()
            .filter_map(|q| q["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// Every message waiting in every queue of this sandbox's vhost, read
    /// through the management API and put back: (queue, payload, headers).
    pub async fn queued_messages(&self) -> Vec<(String, String, String)> {
        let base = mgmt_base();
        let mut out = Vec::new();
        for name in self.queue_names().await {
            let url = format!("{base}/api/queues/{}/{}/get", self.prefix, urlencode(&name));
            let r = mgmt(self.http.post(url))
                .json(&json!({"count": 10_000, "ackmode": "ack_requeue_true", "encoding": "auto"}))
                .send()
                .await
                .expect("get messages");
            // Exclusive queues of other connections cannot be read; they
            // are transient.
            let Ok(messages) = r.json::<Vec<Value>>().await else {
                continue;
            };
            for m in messages {
                out.push((
                    name.clone(),
                    m["payload"].as_str().unwrap_or_default().to_owned(),
                    m["properties"].to_string(),
                ));
            }
        }
        out
    }

    /// Removes the vhost and the databases now.
    pub async fn close(mut self) {
        cleanup(&self.prefix).await;
        self.cleaned = true;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let prefix = self.prefix.clone();
        // Possibly inside a panicking test's runtime: clean up from a thread
        // with its own runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(cleanup(&prefix));
            }
        })
        .join();
    }
}

/// Four services in this process, in their own [`Sandbox`].
pub struct TestSystem {
    pub sandbox: Sandbox,
    pub options: Options,
    pub http: reqwest::Client,
    /// Per service: its broker user and URL, when each has its own.
    pub broker_users: Option<[(String, String); 4]>,
    /// Each service's HTTP port once it first bound one (0 before), kept
    /// for the system's life so that a restarted service is where order-svc
    /// (and a test) expects it.
    ports: [u16; 4],
    running: [Option<Running>; 4],
}

impl std::ops::Deref for TestSystem {
    type Target = Sandbox;

    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

impl TestSystem {
    pub fn builder() -> Options {
        Options::default()
    }

    pub async fn spawn() -> TestSystem {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> TestSystem {
        let sandbox = Sandbox::new().await;
        let http = match &options.tokens {
            None => sandbox.http.clone(),
            Some(tokens) => {
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {}", tokens.admin).parse().unwrap(),
                );
                reqwest::Client::builder()
                    .default_headers(headers)
                    .build()
                    .unwrap()
            }
        };
        let broker_users = if options.broker_user_per_service {
            if options.confined_broker_users {
                // What `sagactl broker setup` does: the topology, declared
                // by an administrator before the confined users connect.
                let conn = lapin::Connection::connect(
                    &sandbox.amqp_url,
                    lapin::ConnectionProperties::default(),
                )
                .await
                .expect("connect as the administrator");
                common::messaging::topology::declare_all(&conn, Default::default())
                    .await
                    .expect("declare the topology");
                let _ = conn.close(200, "declared".into()).await;
            }
            let mut users = Vec::new();
            for svc in Svc::ALL {
                let id = svc.identity();
                let permissions = options
                    .confined_broker_users
                    .then(|| common::messaging::permissions::for_service(&id));
                users.push(
                    sandbox
                        .broker_user_with(&id.database_role(), permissions.as_ref())
                        .await,
                );
            }
            Some(users.try_into().expect("four services"))
        } else {
            None
        };
        let mut system = TestSystem {
            http,
            broker_users,
            sandbox,
            options,
            ports: [0; 4],
            running: Default::default(),
        };
        // order-svc last: it is told where the others listen.
        for svc in [Svc::Payment, Svc::Inventory, Svc::Notification, Svc::Order] {
            if system.options.start[svc.index()] {
                system.start(svc).await;
            }
        }
        for svc in Svc::ALL {
            if system.options.start[svc.index()] {
                system.wait_healthy(svc).await;
            }
        }
        system
    }

    fn common_config(&self, svc: Svc) -> CommonConfig {
        let mut amqp_url = self.broker_url(svc);
        if self.options.dead_broker_node_first {
            // Same user and vhost, a port where nothing listens.
            let dead = amqp_url.replacen(":5672/", &format!(":{}/", free_port()), 1);
            amqp_url = format!("{dead},{amqp_url}");
        }
        let mut database_url = self.database_url(svc);
        if self.options.dead_database_host_first {
            database_url = database_url.replacen(
                "@127.0.0.1:5432/",
                &format!("@127.0.0.1:{},127.0.0.1:5432/", free_port()),
                1,
            ) + "?target_session_attrs=read-write";
        }
        let mut c = CommonConfig::new(amqp_url, database_url);
        c.producer_users = self.broker_users.as_ref().map(|users| {
            Svc::ALL
                .iter()
                .zip(users)
                .map(|(s, (user, _))| format!("{}={user}", s.identity().name))
                .collect::<Vec<_>>()
                .join(",")
        });
        c.http_addr = Some(format!("127.0.0.1:{}", self.ports[svc.index()]));
        c.db_pool_size = self.options.pool_size;
        c.retry_max_attempts = self.options.retry_max_attempts;
        c.handler_timeout_ms = self.options.handler_timeout_ms;
        c.fault_delay_ms = self.options.fault_delay[svc.index()]
            .as_deref()
            .map(|d| d.parse().expect("valid fault delay"));
        c.shutdown_grace_ms = 5000;
        c.dev_mode = true;
        if let Some(url) = &self.options.otlp_endpoint {
            c.otel_exporter_otlp_endpoint = Some(url.clone());
            c.otel_exporter_otlp_protocol = "http/json".to_owned();
        }
        if let Some(ms) = self.options.http_header_timeout_ms {
            c.http_header_timeout_ms = ms;
        }
        c.api_token = self.options.tokens.as_ref().map(|t| t.api.parse().unwrap());
        c.api_clients = self
            .options
            .api_clients
            .as_ref()
            .map(|s| s.parse().unwrap());
        c.admin_token = self
            .options
            .tokens
            .as_ref()
            .map(|t| t.admin.parse().unwrap());
        c
    }

    /// The AMQP URL `svc` connects with: its own user's, or the shared one.
    pub fn broker_url(&self, svc: Svc) -> String {
        self.broker_users.as_ref().map_or_else(
            || self.amqp_nodes.clone(),
            |users| users[svc.index()].1.clone(),
        )
    }

    /// Starts (or restarts) one service.
    pub async fn start(&mut self, svc: Svc) {
        assert!(
            self.running[svc.index()].is_none(),
            "{svc:?} is already running"
        );
        let common = self.common_config(svc);
        let running = match svc {
            Svc::Order => {
                let mut c = order_svc::Config::new(common);
                c.saga_deadline_ms = self.options.deadline_ms;
                if let Some(ms) = self.options.long_deadline_ms {
                    c.saga_long_deadline_ms = ms;
                }
                c.timeout_scan_ms = 50;
                c.payment_svc_url = self.peer_url(Svc::Payment);
                c.inventory_svc_url = self.peer_url(Svc::Inventory);
                c.notification_svc_url = self.peer_url(Svc::Notification);
                // Tests look for findings within seconds, not minutes.
                c.reconcile_interval_ms = 500;
                c.reconcile_grace_ms = 1000;
                launch::<order_svc::App>(c).await
            }
            Svc::Payment => launch::<payment_svc::App>(payment_svc::Config::new(common)).await,
            Svc::Inventory => {
                let mut c = inventory_svc::Config::new(common);
                if let Some(ms) = self.options.hold_expiry_grace_ms {
                    c.hold_expiry_grace_ms = ms;
                }
                launch::<inventory_svc::App>(c).await
            }
            Svc::Notification => {
                let mut c = notification_svc::Config::new(common);
                c.smtp_url = self.options.smtp_url.clone();
                launch::<notification_svc::App>(c).await
            }
        };
        self.ports[svc.index()] = running
            .base_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a service's base URL ends with its port");
        self.running[svc.index()] = Some(running);
    }

    /// Where order-svc finds `svc`: where it listens, or — not started yet —
    /// a free port it will be started on.
    fn peer_url(&mut self, svc: Svc) -> String {
        if self.ports[svc.index()] == 0 {
            self.ports[svc.index()] = free_port();
        }
        format!("http://127.0.0.1:{}", self.ports[svc.index()])
    }

    /// Stops one service gracefully (drains, flushes its outbox).
    pub async fn stop(&mut self, svc: Svc) {
        if let Some(r) = self.running[svc.index()].take() {
            r.cancel.cancel();
            match tokio::time::timeout(Duration::from_secs(20), r.task).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("{svc:?} did not stop cleanly: {other:?}"),
            }
        }
    }

    /// Waits until the service reports ready (broker and database up).
    pub async fn wait_healthy(&self, svc: Svc) {
        wait_for_health(
            &self.http,
            self.url(svc),
            &format!("{svc:?}"),
            Duration::from_secs(30),
        )
        .await;
    }

    /// Base URL of a running service.
    pub fn url(&self, svc: Svc) -> &str {
        &self.running[svc.index()]
            .as_ref()
            .unwrap_or_else(|| panic!("{svc:?} is not running"))
            .base_url
    }

    // ----- HTTP helpers -----

    pub async fn put(&self, svc: Svc, path: &str, body: Value) -> Value {
        let r = self
            .http
            .put(format!("{}{path}", self.url(svc)))
            .json(&body)
            .send()
            .await
            .expect("PUT");
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
        let status = r.status().as_u16();
        let body = r.json().await.expect("JSON");
        openapi::assert_in_contract(svc, "PUT", path, status, Some(&body));
        body
    }

    /// GET a JSON document; `None` on 404.
    pub async fn get(&self, svc: Svc, path: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.url(svc)))
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        let bytes = r.bytes().await.expect("GET body");
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        openapi::assert_in_contract(svc, "GET", path, status, body.as_ref());
        if status == 404 {
            return None;
        }
        assert!((200..300).contains(&status), "GET {path}: {status}");
        Some(body.unwrap_or_else(|| panic!("GET {path}: the body is not JSON")))
    }

    pub async fn set_price(&self, item: &str, price_cents: i64) {
        self.put(
            Svc::Order,
            &format!("/catalog/{item}"),
            json!({ "price_cents": price_cents }),
        )
        .await;
    }

    pub async fn set_stock(&self, item: &str, available: i32) {
        self.put(
            Svc::Inventory,
            &format!("/items/{item}"),
            json!({ "available": available }),
        )
        .await;
    }

    pub async fn set_balance(&self, customer: &str, balance_cents: i64) {
        self.put(
            Svc::Payment,
            &format!("/accounts/{customer}"),
            json!({ "balance_cents": balance_cents }),
        )
        .await;
    }

    pub async fn set_email(&self, customer: &str, email: &str) {
        self.put(
            Svc::Notification,
            &format!("/customers/{customer}"),
            json!({ "email": email }),
        )
        .await;
    }

    /// `POST /orders`: (HTTP status, body).
    pub async fn post_order(&self, order: &Value) -> (u16, Value) {
        self.post_order_with_key(order, None).await
    }

    pub async fn post_order_with_key(&self, order: &Value, key: Option<&str>) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/orders", self.url(Svc::Order)))
            .json(order);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await.expect("POST /orders");
        let status = r.status().as_u16();
        let body = r.json().await.expect("JSON body");
        openapi::assert_in_contract(Svc::Order, "POST", "/orders", status, Some(&body));
        (status, body)
    }

    pub async fn order(&self, order_id: &str) -> Value {
        self.get(Svc::Order, &format!("/orders/{order_id}"))
            .await
            .unwrap_or_else(|| panic!("order {order_id} not found"))
    }

    pub async fn payment(&self, order_id: &str) -> Option<Value> {
        self.get(Svc::Payment, &format!("/payments/{order_id}"))
            .await
    }

    pub async fn reservation(&self, order_id: &str) -> Option<Value> {
        self.get(Svc::Inventory, &format!("/reservations/{order_id}"))
            .await
    }

    pub async fn balance(&self, customer: &str) -> Option<i64> {
        self.get(Svc::Payment, &format!("/accounts/{customer}"))
            .await
            .map(|v| v["balance_cents"].as_i64().unwrap())
    }

    /// (available, held) of an item.
    pub async fn stock(&self, item: &str) -> (i64, i64) {
        let v = self
            .get(Svc::Inventory, &format!("/items/{item}"))
            .await
            .unwrap_or_else(|| panic!("item {item} not found"));
        (
            v["available"].as_i64().unwrap(),
            v["held"].as_i64().unwrap(),
        )
    }

    /// Waits until an item's (available, held) is `expected` (confirmations
    /// and compensations land a moment after the result dict).
    pub async fn wait_for_stock(&self, item: &str, expected: (i64, i64)) {
        let mut last = (0, 0);
        let reached = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                last = self.stock(item).await;
                if last == expected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "stock of {item}: expected {expected:?}, still {last:?}"
        );
    }

    pub async fn emails(&self, order_id: &str) -> Vec<Value> {
        let v = self
            .get(Svc::Notification, &format!("/emails?order_id={order_id}"))
            .await
            .expect("emails");
        v.as_array().cloned().unwrap_or_default()
    }

    /// The kinds of the emails sent for an order, oldest first.
    pub async fn email_kinds(&self, order_id: &str) -> Vec<String> {
        self.emails(order_id)
            .await
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    /// A service's `/metrics` text.
    pub async fn metrics(&self, svc: Svc) -> String {
        metrics_text(&self.http, self.url(svc)).await
    }
}

/// The `/metrics` text of the service at `base_url`.
pub async fn metrics_text(http: &reqwest::Client, base_url: &str) -> String {
    http.get(format!("{base_url}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text")
}

impl TestSystem {
    /// Stops every service; the sandbox is removed when the system drops
    /// (also when a test panics before getting here).
    pub async fn shutdown(mut self) {
        for svc in Svc::ALL {
            self.stop(svc).await;
        }
    }
}

impl Drop for TestSystem {
    fn drop(&mut self) {
        for r in self.running.iter().flatten() {
            r.cancel.cancel();
            r.task.abort();
        }
    }
}

impl Sandbox {
    /// A connection to a service's own database (for assertions on rows).
    pub async fn pg(&self, svc: Svc) -> PgConnection {
        PgConnection::connect(&self.database_url(svc))
            .await
            .expect("connect to the service's database")
    }

    /// Like [`Sandbox::pg`], but `None` while the database is unreachable.
    pub async fn pg_try(&self, svc: Svc) -> Option<PgConnection> {
        PgConnection::connect(&self.database_url(svc)).await.ok()
    }

    /// A connection to this test's vhost.
    pub async fn amqp(&self) -> Connection {
        Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .expect("connect to this test's vhost")
    }

    /// Publishes to `saga.events` (persistent, JSON) and waits for the
    /// confirm. `conn` must be [`Self::amqp`]'s: the message is stamped with
    /// the services' shared broker user (unless `props` names one), so the
    /// services take it as one of their own events.
    pub async fn publish(
        &self,
        conn: &Connection,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let mut props = props
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if props.user_id().is_none() {
            props = props.with_user_id(amqp_user(&self.amqp_url).into());
        }
        let confirm = ch
            .basic_publish(
                EXCHANGE.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let _ = ch.close(200, "done".into()).await;
    }

    /// Closes, from the server side, every AMQP connection to this test's
    /// vhost (as a broker restart would); returns how many it closed.
    pub async fn drop_broker_connections(&self) -> usize {
        let base = mgmt_base();
        let list: Vec<Value> = mgmt(
            self.http
                .get(format!("{base}/api/vhosts/{}/connections", self.prefix)),
        )
        .send()
        .await
        .expect("list connections")
        .json()
        .await
        .expect("JSON");
        let mut closed = 0;
        for c in list {
            let Some(name) = c["name"].as_str() else {
                continue;
            };
            let url = reqwest::Url::parse(&format!("{base}/api/connections/"))
                .unwrap()
                .join(&urlencode(name))
                .unwrap();
            if mgmt(self.http.delete(url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                closed += 1;
            }
        }
        closed
    }

    /// How many AMQP connections the broker lists for this test's vhost.
    pub async fn broker_connections(&self) -> usize {
        let base = mgmt_base();
        let list: Vec<Value> = mgmt(
            self.http
                .get(format!("{base}/api/vhosts/{}/connections", self.prefix)),
        )
        .send()
        .await
        .expect("list connections")
        .json()
        .await
        .unwrap_or_default();
        list.len()
    }

    /// Terminates, from the server side, every PostgreSQL session on this
    /// test's databases (as a database restart would); returns how many.
    pub async fn drop_db_connections(&self) -> i64 {
        let mut admin = PgConnection::connect(&format!("{}/postgres", pg_base()))
            .await
            .expect("connect to postgres");
        let n: i64 = sqlx::query_scalar(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where datname like $1 || '\\_%'",
        )
        .bind(&self.prefix)
        .fetch_one(&mut admin)
        .await
        .expect("terminate backends");
        let _ = admin.close().await;
        n
    }
}

/// A free port on 127.0.0.1 (for a service started later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn launch<S: Service>(config: S::Config) -> Running {
    let app = S::build(config).await.expect("service builds");
    let base_url = format!("http://{}", app.local_addr());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(app.run(cancel.clone()));
    Running {
        base_url,
        cancel,
        task,
    }
}

/// Waits until `GET {base_url}/health` answers 200, or panics after `timeout`.
pub async fn wait_for_health(
    http: &reqwest::Client,
    base_url: &str,
    name: &str,
    timeout: Duration,
) {
    let url = format!("{base_url}/health");
    eventually(timeout, &format!("{name} to be healthy"), || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.get(&url).send().await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
}

/// Polls `f` until it yields `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of every series of the metric `name` in a Prometheus text whose
/// labels include all of `labels` (0 if there is none).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The mission's example order, with a real test card.
pub fn order_dict(customer: &str, items: &[(&str, i64)]) -> Value {
    order_with_card(customer, items, "4242 4242 4242 4242")
}

/// The test card 4242 4242 4242 4242, sealed for `order_id` and
/// `amount_cents` with the development key, as order-svc seals it into
/// `order.created`.
pub fn sealed_test_card(order_id: Uuid, amount_cents: i64) -> common::saga::card::SealedCard {
    let card = common::saga::card::CardDetails {
        card_number: "4242424242424242".into(),
        expiry_date: "12/30".into(),
        cvv: "123".into(),
    };
    let binding = common::saga::card::CardBinding {
        order_id,
        amount_cents,
    };
    common::saga::card::CardSealer::new(None)
        .expect("the development key")
        .seal(&card, binding)
}

pub fn order_with_card(customer: &str, items: &[(&str, i64)], card: &str) -> Value {
    json!({
        "customer_id": customer,
        "items": items.iter().map(|(id, q)| json!({"item_id": id, "quantity": q})).collect::<Vec<_>>(),
        "payment_info": {"card_number": card, "expiry_date": "12/30", "cvv": "123"},
    })
}

/// A queue of this test's own, bound to `saga.events` with `keys`, to watch
/// the events go by.
pub struct Tap {
    consumer: lapin::Consumer,
    _channel: lapin::Channel,
}

impl Tap {
    pub async fn new(conn: &Connection, keys: &[&str]) -> Tap {
        Self::try_new(conn, keys).await.expect("tap queue")
    }

    /// [`Tap::new`] that reports failure instead of panicking (for code
    /// that must survive a broker restart).
    pub async fn try_new(conn: &Connection, keys: &[&str]) -> Result<Tap, lapin::Error> {
        let ch = conn.create_channel().await?;
        let q = ch
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
        for key in keys {
            ch.queue_bind(
                q.name().clone(),
                EXCHANGE.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Tap {
            consumer,
            _channel: ch,
        })
    }

    /// A queue to receive replies on (for `reply_to`); returns its name.
    pub async fn reply_queue(conn: &Connection) -> (String, Tap) {
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "replies".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (
            q.name().to_string(),
            Tap {
                consumer,
                _channel: ch,
            },
        )
    }

    /// The next message within `timeout`, acked.
    pub async fn next(&mut self, timeout: Duration) -> Option<lapin::message::Delivery> {
        let d = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .ok()??
            .ok()?;
        // Bounded: an ack on a channel a broker restart killed can wait
        // forever (lapin), and a tap's ack matters to no one.
        tokio::time::timeout(
            Duration::from_secs(5),
            d.acker.ack(BasicAckOptions::default()),
        )
        .await
        .ok()?
        .ok()?;
        Some(d)
    }

    /// Next message whose routing key is `key` and correlation id `order_id`.
    pub async fn next_for(
        &mut self,
        key: &str,
        order_id: &str,
        timeout: Duration,
    ) -> Option<lapin::message::Delivery> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let d = self.next(left).await?;
            let corr = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            if d.routing_key.as_str() == key && corr.as_deref() == Some(order_id) {
                return Some(d);
            }
        }
    }
}

// ----- vhosts and databases -----

// ----- parking queues -----

/// The messages parked in `queue` now, taken off it: (message id, reason).
pub async fn parked(conn: &Connection, queue: &str) -> Vec<(String, String)> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let reason = common::messaging::delivery::header(&headers, "x-parked-reason")
            .unwrap_or_else(|| "(no reason)".to_owned());
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        out.push((id, reason));
    }
    let _ = ch.close(200, "done".into()).await;
    out
}

/// Collects `n` parked messages from `queue` (waiting up to 10 s), and
/// asserts there are exactly `n`.
pub async fn drain_parked(conn: &Connection, queue: &str, n: usize) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    while all.len() < n && tokio::time::Instant::now() < deadline {
        all.extend(parked(conn, queue).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(all.len(), n, "parked in {queue}: {all:?}");
    all
}

/// Percent-encodes a path segment.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn mgmt(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.basic_auth("guest", Some("guest"))
}

async fn create_vhost(name: &str) {
    let http = reqwest::Client::new();
    let base = mgmt_base();
    let r = mgmt(http.put(format!("{base}/api/vhosts/{name}")))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ management API not reachable at {base} ({e}); start RabbitMQ with the \
                 management plugin (scripts/dev-up.sh) or set TEST_RABBITMQ_MGMT"
            )
        });
    assert!(
        r.status().is_success(),
        "creating vhost {name}: {}",
        r.status()
    );
    let r = mgmt(http.put(format!("{base}/api/permissions/{name}/guest")))
        .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await
        .expect("set vhost permissions");
    assert!(r.status().is_success(), "vhost permissions: {}", r.status());
}

async fn cleanup(prefix: &str) {
    let http = reqwest::Client::new();
    let _ = mgmt(http.delete(format!("{}/api/vhosts/{prefix}", mgmt_base())))
        .send()
        .await;
    // Users made by `broker_user`.
    if let Ok(r) = mgmt(http.get(format!("{}/api/users", mgmt_base())))
        .send()
        .await
        && let Ok(users) = r.json::<Vec<Value>>().await
    {
        let own = format!("{prefix}_");
        for user in users.iter().filter_map(|u| u["name"].as_str()) {
            if user.starts_with(&own) {
                let _ = mgmt(http.delete(format!("{}/api/users/{user}", mgmt_base())))
                    .send()
                    .await;
            }
        }
    }
    if let Ok(mut admin) = PgConnection::connect(&format!("{}/postgres", pg_base())).await {
        for svc in Svc::ALL {
            let db = format!("{prefix}_{}", svc.identity().database);
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "drop database if exists \"{db}\" with (force)"
            )))
            .execute(&mut admin)
            .await;
        }
        let _ = admin.close().await;
    }
}

/// Removes test vhosts and databases more than an hour old (left by a
/// killed test process). Runs once per process.
async fn sweep_stale_resources() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let cutoff = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
                - 3600;
            let stale = |name: &str| -> Option<String> {
                let rest = name.strip_prefix("st_")?;
                let (ts, rest) = rest.split_once('_')?;
                let ts: u64 = ts.parse().ok()?;
                let id = rest.get(..8)?;
                (ts < cutoff).then(|| format!("st_{ts}_{id}"))
            };
            let mut prefixes = std::collections::BTreeSet::new();
            let http = reqwest::Client::new();
            for listing in ["vhosts", "users"] {
                if let Ok(r) = mgmt(http.get(format!("{}/api/{listing}", mgmt_base())))
                    .send()
                    .await
                    && let Ok(names) = r.json::<Vec<Value>>().await
                {
                    prefixes.extend(names.iter().filter_map(|v| stale(v["name"].as_str()?)));
                }
            }
            if let Ok(mut admin) = PgConnection::connect(&format!("{}/postgres", pg_base())).await {
                let names: Vec<String> = sqlx::query_scalar(
                    "select datname from pg_database where datname like 'st\\_%'",
                )
                .fetch_all(&mut admin)
                .await
                .unwrap_or_default();
                prefixes.extend(names.iter().filter_map(|n| stale(n)));
                let _ = admin.close().await;
            }
            for p in prefixes {
                cleanup(&p).await;
            }
        })
        .await;
}

fn init_test_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            common::runtime::telemetry::init_tracing();
        }
    });
}
