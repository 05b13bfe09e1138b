//! Where the system under test is: its four HTTP APIs, its broker, and —
//! when they can be reached — the RabbitMQ management API and PostgreSQL,
//! to count messages and commits.
//!
//! Against a running system the locations come from the environment:
//!
//! | variable | default |
//! |---|---|
//! | `ORDER_SVC_URL` | `http://127.0.0.1:8080` (comma-separated: several replicas) |
//! | `PAYMENT_SVC_URL` | `http://127.0.0.1:8081` |
//! | `INVENTORY_SVC_URL` | `http://127.0.0.1:8082` |
//! | `NOTIFICATION_SVC_URL` | `http://127.0.0.1:8083` |
//! | `AMQP_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `RABBITMQ_MGMT_URL` | `http://127.0.0.1:15672` (user and password from `AMQP_URL`) |
//! | `ADMIN_TOKEN` | unset; when the system requires tokens, sent with every request |
//! | `BENCH_PG_URL` | `postgres://postgres@127.0.0.1:5432/postgres` (the system's PostgreSQL server) |

use common::runtime::config::DEFAULT_AMQP_URL;

use crate::Svc;
use crate::process::ProcessSystem;

/// The system a benchmark drives.
#[derive(Debug, Clone)]
pub struct Target {
    pub order_urls: Vec<String>,
    pub payment_url: String,
    pub inventory_url: String,
    pub notification_url: String,
    pub amqp_url: String,
    /// Management API base URL, user, password and vhost.
    pub mgmt: (String, String, String, String),
    /// A PostgreSQL URL of the system's server, to read its transaction
    /// counter through.
    pub pg: String,
    /// The services' processes (pid, service), if the benchmark started them.
    pub pids: Option<Vec<(u32, &'static str)>>,
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// (user, password, vhost) of an `amqp://user:pass@host:port/vhost` URL.
fn amqp_parts(url: &str) -> (String, String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (auth, hostpath) = rest.split_once('@').unwrap_or(("guest:guest", rest));
    let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
    let vhost = hostpath
        .split_once('/')
        .map_or("", |(_, v)| v)
        .split('?')
        .next()
        .unwrap_or_default();
    let vhost = if vhost.is_empty() {
        "/".to_owned()
    } else {
        percent_decode(vhost)
    };
    (user.to_owned(), pass.to_owned(), vhost)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP client for the system's APIs: with `ADMIN_TOKEN` set, every
/// request carries it (the benchmark sets up the shop and reads every
/// service, which needs the admin token).
pub fn http_client() -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder();
    if let Ok(token) = std::env::var("ADMIN_TOKEN")
        && let Ok(value) = format!("Bearer {}", token.trim()).parse()
    {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, value);
        builder = builder.default_headers(headers);
    }
    builder
}

impl Target {
    /// A system already running, located by the environment.
    pub fn from_env() -> Target {
        let amqp_url = env_or("AMQP_URL", DEFAULT_AMQP_URL);
        let (user, pass, vhost) = amqp_parts(&amqp_url);
        Target {
            order_urls: env_or("ORDER_SVC_URL", "http://127.0.0.1:8080")
                .split(',')
                .map(|u| u.trim().trim_end_matches('/').to_owned())
                .collect(),
            payment_url: env_or("PAYMENT_SVC_URL", "http://127.0.0.1:8081"),
            inventory_url: env_or("INVENTORY_SVC_URL", "http://127.0.0.1:8082"),
            notification_url: env_or("NOTIFICATION_SVC_URL", "http://127.0.0.1:8083"),
            mgmt: (
                env_or("RABBITMQ_MGMT_URL", "http://127.0.0.1:15672"),
                user,
                pass,
                vhost,
            ),
            pg: env_or(
                "BENCH_PG_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            amqp_url,
            pids: None,
        }
    }

    /// A system the benchmark started itself.
    pub fn of(sys: &ProcessSystem) -> Target {
        let (user, pass, _) = amqp_parts(&sys.amqp_url);
        let base = |svc| sys.urls(svc)[0].clone();
        Target {
            order_urls: sys.urls(Svc::Order),
            payment_url: base(Svc::Payment),
            inventory_url: base(Svc::Inventory),
            notification_url: base(Svc::Notification),
            amqp_url: sys.amqp_url.clone(),
            mgmt: (crate::broker_mgmt_url(), user, pass, sys.prefix.clone()),
            pg: format!(
                "{}/postgres",
                env_or("TEST_PG_BASE", "postgres://postgres@127.0.0.1:5432")
            ),
            pids: Some(
                sys.replicas
                    .iter()
                    .filter_map(|r| Some((r.pid()?, r.svc.identity().name)))
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_urls_give_their_credentials_and_vhost() {
        assert_eq!(
            amqp_parts("amqp://guest:guest@127.0.0.1:5672/%2f"),
            ("guest".into(), "guest".into(), "/".into())
        );
        assert_eq!(
            amqp_parts("amqp://u:p@h:1/shop"),
            ("u".into(), "p".into(), "shop".into())
        );
        assert_eq!(amqp_parts("amqp://u:p@h:1").2, "/");
    }
}
