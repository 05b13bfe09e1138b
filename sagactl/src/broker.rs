//! `sagactl broker …`: what an administrator sets up on the broker before
//! the services run as confined users — the topology, the users and the
//! permissions each gets (`scripts/broker-users.sh` and the compose file's
//! `broker-setup` step use it).

use std::path::Path;

use anyhow::{Context as _, bail};
use common::messaging::permissions::{self, Permissions};
use common::messaging::topology::{self, QueueType};
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

/// Where the users' passwords come from, and where the management API is.
pub struct Users<'a> {
    /// A file per user, named after it, holding its password.
    pub passwords: &'a Path,
    /// The management API's base URL (`http://host:15672`).
    pub management_url: &'a str,
    /// Put before every user's name (several systems on one broker, a vhost
    /// each); the password files keep the plain names.
    pub prefix: &'a str,
}

/// Declares the exchanges and every service's queues and bindings, as the
/// user of `amqp_url` (an administrator of the vhost); then, if asked,
/// creates or updates every user with its password and permissions.
pub async fn setup(
    amqp_url: &str,
    queue_type: QueueType,
    users: Option<Users<'_>>,
) -> anyhow::Result<()> {
    let conn = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("cannot connect to the broker")?;
    topology::declare_all(&conn, queue_type)
        .await
        .context("cannot declare the topology (an administrator of the vhost must)")?;
    let _ = conn.close(200, "topology declared".into()).await;
    println!("topology declared ({queue_type} queues)");
    if let Some(users) = users {
        create_users(amqp_url, &users).await?;
    }
    Ok(())
}

/// Each user `sagactl broker permissions` lists, by name.
fn users() -> Vec<(String, Permissions)> {
    let mut users: Vec<(String, Permissions)> = permissions::all_services()
        .into_iter()
        .map(|(svc, p)| (svc.database_role(), p))
        .collect();
    users.push(("order_client".to_owned(), permissions::for_client()));
    users
}

/// Creates (or updates) every user with the password in its file, through
/// the management API, as the administrator of `amqp_url`.
async fn create_users(amqp_url: &str, users: &Users<'_>) -> anyhow::Result<()> {
    let url: lapin::uri::AMQPUri = amqp_url.parse().map_err(anyhow::Error::msg)?;
    let (admin, admin_password) = (
        url.authority.userinfo.username,
        url.authority.userinfo.password,
    );
    let vhost = url.vhost;
    let vhost_enc: String = vhost
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let base = users.management_url.trim_end_matches('/');
    let http = reqwest::Client::new();
    for (name, p) in self::users() {
        let file = users.passwords.join(&name);
        let user = format!("{}{name}", users.prefix);
        let password = std::fs::read_to_string(&file)
            .with_context(|| format!("no password for {user} (read {})", file.display()))?;
        let calls = [
            (
                format!("{base}/api/users/{user}"),
                json!({"password": password.trim(), "tags": ""}),
            ),
            (
                format!("{base}/api/permissions/{vhost_enc}/{user}"),
                json!({"configure": p.configure, "write": p.write, "read": p.read}),
            ),
        ];
        for (url, body) in calls {
            put(&http, &url, &admin, &admin_password, &body).await?;
        }
        // Only the topic permissions listed: earlier ones are removed first.
        let topics = format!("{base}/api/topic-permissions/{vhost_enc}/{user}");
        let _ = http
            .delete(&topics)
            .basic_auth(&admin, Some(&admin_password))
            .send()
            .await;
        for t in &p.topics {
            let body = json!({"exchange": t.exchange, "write": t.write, "read": t.read});
            put(&http, &topics, &admin, &admin_password, &body).await?;
        }
        println!("user {user}: permissions set");
    }
    Ok(())
}

async fn put(
    http: &reqwest::Client,
    url: &str,
    user: &str,
    password: &str,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    let response = http
        .put(url)
        .basic_auth(user, Some(password))
        .json(body)
        .send()
        .await
        .with_context(|| format!("cannot reach the management API ({url})"))?;
    if !response.status().is_success() {
        bail!("the management API refused {url}: {}", response.status());
    }
    Ok(())
}

/// Prints each user's permissions, a line each, tab-separated:
/// `permissions <user> <configure> <write> <read>` and
/// `topic <user> <exchange> <write> <read>`. Users: each service's
/// (`order_svc`, …) and `order_client`, the user AMQP clients place orders
/// as.
pub fn print_permissions() {
    for (user, p) in users() {
        println!(
            "permissions\t{user}\t{}\t{}\t{}",
            p.configure, p.write, p.read
        );
        for t in p.topics {
            println!("topic\t{user}\t{}\t{}\t{}", t.exchange, t.write, t.read);
        }
    }
}
