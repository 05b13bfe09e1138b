//! `sagactl` against the whole saga (four services in-process, the real
//! RabbitMQ and PostgreSQL; see `saga_tests`), run as the binary it is.

use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use lapin::BasicProperties;
use saga_tests::{Svc, TestSystem, Tokens, order_dict};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use uuid::Uuid;

/// What a run of sagactl gave.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Runs sagactl against `sys` with `args`, `stdin`, and extra environment.
async fn sagactl_with(
    sys: &TestSystem,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagactl"));
    cmd.args(args)
        .env("SAGA_API_URL", sys.url(Svc::Order))
        .env("PAYMENT_SVC_URL", sys.url(Svc::Payment))
        .env("INVENTORY_SVC_URL", sys.url(Svc::Inventory))
        .env("NOTIFICATION_SVC_URL", sys.url(Svc::Notification))
        .env("AMQP_URL", &sys.amqp_url)
        .env_remove("SAGA_API_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run sagactl");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.expect("write stdin");
    }
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("sagactl finished within 60 s")
        .expect("sagactl output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn sagactl(sys: &TestSystem, args: &[&str]) -> Run {
    sagactl_with(sys, args, None, &[]).await
}

async fn stock_the_shop(sys: &TestSystem) {
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_are_placed_and_sagas_listed_with_clear_exit_codes() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("rich", 100_000).await;
    sys.set_balance("poor", 0).await;

    // Placed from stdin: the result dict on stdout.
    let order = order_dict("rich", &[("productA", 1)]).to_string();
    let placed = sagactl_with(&sys, &["order", "place", "-"], Some(&order), &[]).await;
    assert_eq!(placed.code, 0, "{placed:?}");
    let result = placed.json();
    assert_eq!(result["status"], "success", "{placed:?}");
    let ok_id = result["order_id"].as_str().expect("order_id").to_owned();

    // A failed order: its failure dict, and exit 5.
    let order = order_dict("poor", &[("productA", 1)]).to_string();
    let failed = sagactl_with(&sys, &["order", "place", "-"], Some(&order), &[]).await;
    assert_eq!(failed.code, 5, "{failed:?}");
    assert_eq!(failed.json()["status"], "failure", "{failed:?}");
    let failed_id = failed.json()["order_id"].as_str().expect("id").to_owned();

    // Not JSON: a usage error, nothing sent.
    let bad = sagactl_with(&sys, &["order", "place", "-"], Some("{nope"), &[]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("not JSON"), "{bad:?}");

    // Listed, as JSON and as a table, and filtered.
    let list = sagactl(&sys, &["saga", "list", "--json"]).await;
    assert_eq!(list.code, 0, "{list:?}");
    let ids: Vec<String> = list.json()["sagas"]
        .as_array()
        .expect("sagas")
        .iter()
        .map(|s| s["order_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(ids.contains(&ok_id) && ids.contains(&failed_id), "{list:?}");
    let table = sagactl(&sys, &["saga", "list"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.contains(&ok_id) && table.stdout.contains("CONFIRMED"));
    let only_failed = sagactl(&sys, &["saga", "list", "--status", "failed", "--json"]).await;
    let text = only_failed.stdout;
    assert!(
        text.contains(&failed_id) && !text.contains(&ok_id),
        "{text}"
    );
    let stuck = sagactl(&sys, &["saga", "list", "--stuck", "--json"]).await;
    assert_eq!(stuck.json()["sagas"], json!([]), "{stuck:?}");
    let bad_status = sagactl(&sys, &["saga", "list", "--status", "LOST"]).await;
    assert_eq!(bad_status.code, 2, "{bad_status:?}");

    // An unknown saga: a message on stderr, exit 3.
    let unknown = Uuid::now_v7().to_string();
    let missing = sagactl(&sys, &["saga", "show", &unknown]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(missing.stderr.contains(&unknown), "{missing:?}");
    assert!(missing.stdout.is_empty(), "{missing:?}");
    let not_an_id = sagactl(&sys, &["saga", "show", "order-1"]).await;
    assert_eq!(not_an_id.code, 2, "{not_an_id:?}");

    // No escalations anywhere: an empty list, exit 0.
    let escalations = sagactl(&sys, &["escalations", "list", "--json"]).await;
    assert_eq!(escalations.code, 0, "{escalations:?}");
    assert_eq!(escalations.json()["escalations"], json!([]));
    let table = sagactl(&sys, &["escalations", "list", "--service", "payment"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.contains("no escalations"), "{table:?}");
    let retry = sagactl(&sys, &["escalations", "retry", &unknown]).await;
    assert_eq!(retry.code, 3, "{retry:?}");

    // A service that is not there: exit 1 and which one.
    let down = sagactl_with(
        &sys,
        &["saga", "list"],
        None,
        &[("SAGA_API_URL", "http://127.0.0.1:9")],
    )
    .await;
    assert_eq!(down.code, 1, "{down:?}");
    assert!(down.stderr.contains("order-svc"), "{down:?}");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn saga_show_prints_the_timeline_of_a_known_saga() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("rich", 100_000).await;
    let order = order_dict("rich", &[("productA", 1)]).to_string();
    let placed = sagactl_with(&sys, &["order", "place", "-"], Some(&order), &[]).await;
    assert_eq!(placed.code, 0, "{placed:?}");
    let id = placed.json()["order_id"].as_str().expect("id").to_owned();

    let shown = sagactl(&sys, &["saga", "show", &id, "--json"]).await;
    assert_eq!(shown.code, 0, "GET /sagas/{{id}}: {shown:?}");
    let saga = shown.json();
    assert_eq!(saga["order_id"], id.as_str());
    assert!(
        saga["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["event"] == "order.created")),
        "{saga}"
    );
    let table = sagactl(&sys, &["saga", "show", &id]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.contains("timeline:"), "{table:?}");
    assert!(table.stdout.contains("order.created"), "{table:?}");
    assert!(
        table.stdout.to_lowercase().contains("decision: confirmed"),
        "{table:?}"
    );

    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn saga_list_violations_lists_what_order_svc_found() {
    let sys = TestSystem::spawn().await;
    let violations = sagactl(&sys, &["saga", "list", "--violations", "--json"]).await;
    assert_eq!(violations.code, 0, "GET /sagas/violations: {violations:?}");
    assert_eq!(violations.json()["violations"], json!([]), "{violations:?}");
    let table = sagactl(&sys, &["saga", "list", "--violations"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.contains("no violations"), "{table:?}");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_sent_and_refusals_exit_4() {
    let tokens = Tokens::random();
    let sys = TestSystem::builder().tokens(tokens.clone()).spawn().await;

    let none = sagactl(&sys, &["saga", "list"]).await;
    assert_eq!(none.code, 4, "{none:?}");
    assert!(none.stderr.contains("token"), "{none:?}");
    let api = [("SAGA_API_TOKEN", tokens.api.as_str())];
    let list = sagactl_with(&sys, &["saga", "list", "--json"], None, &api).await;
    assert_eq!(list.code, 0, "{list:?}");
    // Escalations need the admin token.
    let refused = sagactl_with(&sys, &["escalations", "list"], None, &api).await;
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(refused.stderr.contains("admin token"), "{refused:?}");
    let admin = sagactl(&sys, &["escalations", "list", "--token", &tokens.admin]).await;
    assert_eq!(admin.code, 0, "{admin:?}");
    sys.shutdown().await;
}

/// An envelope as its owner would have sent it: (event id, body).
fn envelope(event_type: &str, order_id: Uuid, data: Value) -> (String, Vec<u8>) {
    let event_id = Uuid::now_v7().to_string();
    let env = json!({
        "event_id": event_id, "event_type": event_type, "version": 1,
        "order_id": order_id, "causation_id": "test", "occurred_at": Utc::now(),
        "deadline_at": Utc::now() + chrono::Duration::seconds(120),
        "producer": format!("{}-svc", event_type.split('.').next().unwrap_or_default()),
        "data": data,
    });
    (event_id, serde_json::to_vec(&env).expect("envelope"))
}

/// `dlq list --json` of one service: (count, messages).
async fn parked(sys: &TestSystem, service: &str) -> (u64, Vec<Value>) {
    let run = sagactl(sys, &["dlq", "list", "--service", service, "--json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let queue = run.json()["queues"][0].clone();
    (
        queue["count"].as_u64().expect("count"),
        queue["messages"].as_array().cloned().unwrap_or_default(),
    )
}

/// Messages ready in `queue`, as the broker counts them now.
async fn ready_in(conn: &lapin::Connection, queue: &str) -> u32 {
    let channel = conn.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let _ = channel.close(200, "done".into()).await;
    declared.message_count()
}

async fn wait_parked(sys: &TestSystem, service: &str, n: u64) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (count, messages) = parked(sys, service).await;
        if count == n {
            return messages;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service}: {count} parked, not {n}: {messages:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_messages_are_listed_shown_replayed_once_fixed_and_purged() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_email("c1", "c1@example.com").await;
    let conn = sys.amqp().await;
    let order_id = Uuid::now_v7();

    // A confirmation that arrives before its reservation exists: inventory-svc
    // parks it (twice: the same message delivered twice).
    let (confirm_id, confirm) = envelope(
        "order.confirmed",
        order_id,
        json!({"customer_id": "c1", "amount_cents": 3000,
               "result": {"status": "success", "order_id": order_id}}),
    );
    for _ in 0..2 {
        let props = BasicProperties::default()
            .with_message_id(confirm_id.as_str().into())
            .with_type("order.confirmed".into())
            .with_correlation_id(order_id.to_string().as_str().into());
        sys.publish(&conn, "order.confirmed", &confirm, props).await;
    }
    let messages = wait_parked(&sys, "inventory-svc", 2).await;
    for m in &messages {
        assert_eq!(m["message_id"], confirm_id.as_str(), "{m}");
        assert_eq!(m["routing_key"], "order.confirmed", "{m}");
        assert!(
            m["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("no reservation"),
            "{m}"
        );
        assert!(m["parked_at"].is_string(), "{m}");
    }
    // Listing did not consume them, and the table shows them too.
    let all = sagactl(&sys, &["dlq", "list"]).await;
    assert_eq!(all.code, 0, "{all:?}");
    assert!(
        all.stdout.contains("inventory-svc.parking: 2 messages"),
        "{all:?}"
    );
    assert!(all.stdout.contains(&confirm_id), "{all:?}");
    // Back in the queue the moment the command returns, not a little later
    // (a quorum queue applies a requeue through its log): a `dlq show` run
    // right after it finds them.
    assert_eq!(ready_in(&conn, "inventory-svc.parking").await, 2);

    // Shown with headers and body.
    let shown = sagactl(&sys, &["dlq", "show", &confirm_id, "--json"]).await;
    assert_eq!(shown.code, 0, "{shown:?}");
    let copies = shown.json();
    assert_eq!(copies.as_array().map(Vec::len), Some(2), "{copies}");
    assert_eq!(copies[0]["body"]["order_id"], order_id.to_string().as_str());
    assert!(
        copies[0]["headers"]["x-parked-reason"]
            .as_str()
            .is_some_and(|r| r.contains("no reservation")),
        "{copies}"
    );
    let text = sagactl(&sys, &["dlq", "show", &confirm_id]).await;
    assert!(text.stdout.contains("x-parked-reason"), "{text:?}");
    let missing = sagactl(&sys, &["dlq", "show", "no-such-message"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");

    // A replay as another broker user is refused with the user to use, and
    // leaves the messages parked.
    let (_, other_url) = sys.broker_user("ops").await;
    let refused = sagactl_with(
        &sys,
        &["dlq", "replay", &confirm_id, "--service", "inventory-svc"],
        None,
        &[("AMQP_URL", other_url.as_str())],
    )
    .await;
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(refused.stderr.contains("\"guest\""), "{refused:?}");
    // (Back in the queue once the refused run's channel has requeued them.)
    wait_parked(&sys, "inventory-svc", 2).await;

    // The cause is fixed: the reservation now exists.
    let (paid_id, paid) = envelope(
        "payment.completed",
        order_id,
        json!({"customer_id": "c1", "amount_cents": 3000, "currency": "USD", "card_last4": "4242",
               "items": [{"item_id": "productA", "quantity": 2, "unit_price_cents": 1500}]}),
    );
    let props = BasicProperties::default().with_message_id(paid_id.as_str().into());
    sys.publish(&conn, "payment.completed", &paid, props).await;
    sys.wait_for_stock("productA", (8, 2)).await;

    // Replayed (both copies): the stock is committed once.
    let replayed = sagactl(
        &sys,
        &["dlq", "replay", &confirm_id, "--service", "inventory"],
    )
    .await;
    assert_eq!(replayed.code, 0, "{replayed:?}");
    assert_eq!(
        replayed.stdout.matches("replayed").count(),
        2,
        "{replayed:?}"
    );
    sys.wait_for_stock("productA", (8, 0)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sys.stock("productA").await, (8, 0));
    assert_eq!(parked(&sys, "inventory-svc").await.0, 0, "parked again");
    let again = sagactl(
        &sys,
        &["dlq", "replay", &confirm_id, "--service", "inventory-svc"],
    )
    .await;
    assert_eq!(again.code, 3, "{again:?}");

    // Purge: only once the service name is typed.
    sys.publish(
        &conn,
        "order.created",
        b"{not json",
        BasicProperties::default().with_message_id("malformed".into()),
    )
    .await;
    wait_parked(&sys, "payment-svc", 1).await;
    let declined = sagactl_with(
        &sys,
        &["dlq", "purge", "--service", "payment-svc"],
        Some("inventory-svc\n"),
        &[],
    )
    .await;
    assert_eq!(declined.code, 1, "{declined:?}");
    assert!(
        declined.stderr.contains("type the service name")
            || declined.stderr.contains("Type the service name"),
        "{declined:?}"
    );
    assert_eq!(parked(&sys, "payment-svc").await.0, 1);
    let purged = sagactl_with(
        &sys,
        &["dlq", "purge", "--service", "payment-svc"],
        Some("payment-svc\n"),
        &[],
    )
    .await;
    assert_eq!(purged.code, 0, "{purged:?}");
    assert!(purged.stdout.contains("purged 1"), "{purged:?}");
    assert_eq!(parked(&sys, "payment-svc").await.0, 0);
    let _ = conn.close(200, "done".into()).await;
    sys.shutdown().await;
}

/// `broker setup --users-from`: the topology declared as the administrator,
/// then a confined user per service with the password in its file — what
/// compose.yaml's `broker-setup` step runs.
#[tokio::test(flavor = "multi_thread")]
async fn broker_setup_declares_the_topology_and_makes_confined_users() {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions};
    use lapin::types::FieldTable;
    let sandbox = saga_tests::Sandbox::new().await;
    let dir = std::env::temp_dir().join(format!("{}-passwords", sandbox.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    for user in [
        "order_svc",
        "payment_svc",
        "inventory_svc",
        "notification_svc",
        "order_client",
    ] {
        std::fs::write(dir.join(user), format!("pw-{user}-{}\n", sandbox.prefix)).unwrap();
    }
    let prefix = format!("{}_", sandbox.prefix);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args(["broker", "setup", "--users-from"])
        .arg(&dir)
        .args(["--management-url", &saga_tests::broker_mgmt_url()])
        .args(["--user-prefix", &prefix])
        .env("AMQP_URL", &sandbox.amqp_url)
        .output()
        .await
        .expect("run sagactl");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "{out:?}");

    let host = saga_tests::amqp_base()
        .split_once('@')
        .map_or_else(|| "127.0.0.1:5672".to_owned(), |(_, h)| h.to_owned());
    let url = format!(
        "amqp://{prefix}notification_svc:pw-notification_svc-{p}@{host}/{p}",
        p = sandbox.prefix
    );
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("notification-svc's user logs in with its password");
    // Its own queue exists (declared by the setup) and is its to consume...
    let ch = conn.create_channel().await.unwrap();
    ch.basic_consume(
        "notification-svc.events".into(),
        "test".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("consume its own queue");
    // ...but not the clients' orders.
    let ch = conn.create_channel().await.unwrap();
    let bound = ch
        .queue_bind(
            "notification-svc.events".into(),
            saga_tests::EXCHANGE.into(),
            "order.requested".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(
        bound
            .as_ref()
            .is_err_and(|e| e.to_string().contains("ACCESS_REFUSED")),
        "{bound:?}"
    );
    let _ = conn.close(200, "bye".into()).await;
    sandbox.close().await;
}
