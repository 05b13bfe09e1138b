//! The benchmark's tools, run for real against RabbitMQ and PostgreSQL.
//! (`saga-bench` itself is exercised by its unit tests and by every
//! benchmark run; what it drives is tested by the other suites.)

use saga_tests::{Sandbox, pg_base};
use serde_json::Value;
use sqlx::Connection as _;

const HOP_FLOOR: &str = env!("CARGO_BIN_EXE_hop-floor");

/// The floor's databases on the server (any run's).
async fn floor_databases() -> Vec<String> {
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", pg_base()))
        .await
        .expect("connect to postgres");
    let names = sqlx::query_scalar(
        "select datname::text from pg_database where datname like 'hopfloor\\_%' order by 1",
    )
    .fetch_all(&mut admin)
    .await
    .expect("list databases");
    let _ = admin.close().await;
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_floor_measures_bare_hops_and_removes_what_it_made() {
    let sandbox = Sandbox::new().await;
    let databases_before = floor_databases().await;
    let out = tokio::process::Command::new(HOP_FLOOR)
        .args(["--rates", "50,100", "--orders", "100", "--stages", "3"])
        .env("AMQP_URL", &sandbox.amqp_url)
        .env("PG_URL", pg_base())
        .output()
        .await
        .expect("run hop-floor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hop-floor failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One JSON line per rate, in the order asked for.
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, rate) in lines.iter().zip([50.0, 100.0]) {
        assert_eq!(line["system"], "hop-floor");
        assert_eq!(line["stages"], 3);
        assert_eq!(line["n"], 100);
        assert_eq!(line["rate"].as_f64(), Some(rate));
        let p50 = line["p50_ms"].as_f64().expect("p50");
        let p99 = line["p99_ms"].as_f64().expect("p99");
        assert!(p50 > 0.0 && p99 >= p50, "{line}");
        let by = &line["cpu_ms_per_order_by_component"];
        for part in ["postgresql", "rabbitmq", "stages"] {
            assert!(by[part].as_f64().is_some_and(|ms| ms >= 0.0), "{line}");
        }
        // Three stages' processes ran and were measured.
        assert!(by["stages"].as_f64() > Some(0.0), "{line}");
    }

    // Its queues and databases are gone.
    assert_eq!(sandbox.queue_names().await, Vec::<String>::new());
    assert_eq!(floor_databases().await, databases_before);
    sandbox.close().await;
}

#[tokio::test]
async fn hop_floor_refuses_a_rate_of_zero() {
    let out = tokio::process::Command::new(HOP_FLOOR)
        .args(["--rates", "0"])
        .output()
        .await
        .expect("run hop-floor");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must be positive"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
