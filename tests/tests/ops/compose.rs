//! compose.yaml validated by Docker Compose itself: `docker compose config`
//! parses, interpolates, merges and checks the file against the Compose
//! specification without a Docker engine. Then the normalized model is
//! checked for what this repository promises: Prometheus and Grafana are in
//! it with the shipped files mounted, and every port is bound to 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::{find_on_path, repo_file, repo_root, run_ok};

/// A Docker Compose v2 command: `$COMPOSE_BIN`, else `docker-compose-v2`
/// (scripts/test-deps.sh), else the Docker CLI's `docker compose` plugin.
fn compose_command() -> Command {
    if let Some(bin) = std::env::var_os("COMPOSE_BIN") {
        return Command::new(bin);
    }
    if let Some(bin) = find_on_path("docker-compose-v2") {
        return Command::new(bin);
    }
    if let Some(docker) = find_on_path("docker") {
        let works = Command::new(&docker)
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if works {
            let mut cmd = Command::new(docker);
            cmd.arg("compose");
            return cmd;
        }
    }
    panic!(
        "Docker Compose v2 is not installed (no $COMPOSE_BIN, docker-compose-v2 or `docker compose`): run scripts/test-deps.sh"
    );
}

/// `docker compose config` of compose.yaml with the variables it requires set.
fn compose_config(extra: &[&str]) -> Command {
    let mut cmd = compose_command();
    cmd.current_dir(repo_root())
        .arg("--file")
        .arg(repo_file("compose.yaml"))
        .args(["--project-name", "order-saga", "config"])
        .args(extra)
        .env("API_TOKEN", "ci-api-token")
        .env("ADMIN_TOKEN", "ci-admin-token")
        .env("GRAFANA_ADMIN_PASSWORD", "ci-grafana-password");
    for var in [
        "COMPOSE_FILE",
        "COMPOSE_PROJECT_NAME",
        "COMPOSE_PROFILES",
        "COMPOSE_ENV_FILES",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn mounts(service: &Value) -> Vec<(String, String, String)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["type"].as_str().unwrap_or_default().to_owned(),
                v["source"].as_str().unwrap_or_default().to_owned(),
                v["target"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn bind_source(service: &Value, name: &str, target: &str) -> PathBuf {
    let found = mounts(service)
        .into_iter()
        .find(|(kind, _, t)| kind == "bind" && t == target);
    let (_, source, _) = found.unwrap_or_else(|| panic!("{name}: nothing bound at {target}"));
    PathBuf::from(source)
}

#[test]
fn docker_compose_validates_compose_yaml() {
    run_ok(&mut compose_config(&["--quiet"]), "docker compose config");

    let json = run_ok(
        &mut compose_config(&["--format", "json"]),
        "docker compose config --format json",
    );
    let model: Value = serde_json::from_str(&json).expect("compose config JSON");
    let services = model["services"].as_object().expect("services");
    for name in [
        "postgres",
        "rabbitmq",
        "order-svc",
        "payment-svc",
        "inventory-svc",
        "notification-svc",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "compose.yaml has no {name}");
    }

    // Every published port is on the loopback interface only.
    for (name, service) in services {
        for port in service["ports"].as_array().into_iter().flatten() {
            assert_eq!(
                port["host_ip"], "127.0.0.1",
                "{name} publishes {port} beyond 127.0.0.1"
            );
        }
        // Every bind mount's source is in the repository.
        for (kind, source, target) in mounts(service) {
            if kind == "bind" {
                assert!(
                    Path::new(&source).exists(),
                    "{name}: {target} is bound to {source}, which does not exist"
                );
            }
        }
    }

    // Prometheus runs the shipped config and rules.
    let prometheus = &services["prometheus"];
    assert_eq!(
        bind_source(prometheus, "prometheus", "/etc/prometheus/prometheus.yml"),
        repo_file("deploy/prometheus/prometheus.yml")
    );
    assert_eq!(
        bind_source(prometheus, "prometheus", "/etc/prometheus/rules"),
        repo_file("deploy/prometheus/rules")
    );
    let command: Vec<&str> = prometheus["command"]
        .as_array()
        .expect("prometheus command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        command.contains(&"--config.file=/etc/prometheus/prometheus.yml"),
        "{command:?}"
    );
    // The services it scrapes are reachable by those names on :8080…:8083.
    let config = std::fs::read_to_string(repo_file("deploy/prometheus/prometheus.yml"))
        .expect("read prometheus.yml");
    for (svc, addr) in [
        ("order-svc", "0.0.0.0:8080"),
        ("payment-svc", "0.0.0.0:8081"),
        ("inventory-svc", "0.0.0.0:8082"),
        ("notification-svc", "0.0.0.0:8083"),
    ] {
        assert_eq!(services[svc]["environment"]["HTTP_ADDR"], addr, "{svc}");
        let port = &addr["0.0.0.0:".len()..];
        assert!(
            config.contains(&format!("job_name: {svc}"))
                && config.contains(&format!("\"{svc}:{port}\"")),
            "prometheus.yml does not scrape {svc}:{port}"
        );
    }

    // Grafana is provisioned from the repository: its data source points at
    // the Prometheus service, its dashboards at the mounted folder.
    let grafana = &services["grafana"];
    let provisioning = bind_source(grafana, "grafana", "/etc/grafana/provisioning");
    assert_eq!(provisioning, repo_file("deploy/grafana/provisioning"));
    assert_eq!(
        bind_source(grafana, "grafana", "/etc/grafana/dashboards"),
        repo_file("deploy/grafana/dashboards")
    );
    let datasource = std::fs::read_to_string(provisioning.join("datasources/prometheus.yml"))
        .expect("datasource provisioning");
    assert!(
        datasource.contains("url: http://prometheus:9090"),
        "{datasource}"
    );
    assert!(datasource.contains("uid: prometheus"), "{datasource}");
    let dashboards = std::fs::read_to_string(provisioning.join("dashboards/saga.yml"))
        .expect("dashboard provisioning");
    assert!(
        dashboards.contains("path: /etc/grafana/dashboards"),
        "{dashboards}"
    );
    assert_eq!(
        grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"],
        "ci-grafana-password"
    );
}

#[test]
fn compose_yaml_refuses_to_start_without_its_secrets() {
    let out = compose_config(&["--quiet"])
        .env_remove("GRAFANA_ADMIN_PASSWORD")
        .output()
        .expect("run docker compose config");
    assert!(
        !out.status.success(),
        "compose.yaml accepted a missing GRAFANA_ADMIN_PASSWORD"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("GRAFANA_ADMIN_PASSWORD"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `docker compose config --format json` of the given compose files.
fn compose_model(overrides: &[&str]) -> Value {
    let mut cmd = compose_command();
    cmd.current_dir(repo_root())
        .arg("--file")
        .arg(repo_file("compose.yaml"));
    for file in overrides {
        cmd.arg("--file").arg(repo_file(file));
    }
    cmd.args(["--project-name", "order-saga", "config", "--format", "json"])
        .env("API_TOKEN", "ci-api-token")
        .env("ADMIN_TOKEN", "ci-admin-token")
        .env("GRAFANA_ADMIN_PASSWORD", "ci-grafana-password")
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROFILES")
        .env_remove("COMPOSE_ENV_FILES");
    let json = run_ok(&mut cmd, "docker compose config --format json");
    serde_json::from_str(&json).expect("compose config JSON")
}

/// Issue 24, item 1: what a user starts without reading the docs is the
/// production set-up — no development mode, password authentication, a
/// confined broker user per service, an unprivileged image, the broker's
/// message size bounded; the convenient set-up is an override named for it.
#[test]
fn the_default_compose_file_is_the_production_setup() {
    let model = compose_model(&[]);
    let services = model["services"].as_object().expect("services");
    for (name, service) in services {
        let mode = &service["environment"]["DEV_MODE"];
        assert!(
            mode.is_null() || mode == "0",
            "{name} runs in development mode ({mode})"
        );
    }

    let postgres = &services["postgres"]["environment"];
    assert!(
        postgres["POSTGRES_HOST_AUTH_METHOD"].is_null(),
        "PostgreSQL trusts connections: {postgres}"
    );
    assert!(
        postgres["POSTGRES_PASSWORD_FILE"].is_string(),
        "no superuser password: {postgres}"
    );
    let rabbitmq = &services["rabbitmq"];
    assert!(
        rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"].is_null(),
        "a broker password written in the compose file"
    );

    // A broker user per service, its own, named in PRODUCER_USERS; no
    // password in the file; its secrets in a volume no other service sees.
    let mut producers = Vec::new();
    let mut mounted: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (name, service) in services {
        for (kind, source, _) in mounts(service) {
            if kind == "volume" {
                mounted.entry(source).or_default().push(name.clone());
            }
        }
    }
    for svc in [
        "order-svc",
        "payment-svc",
        "inventory-svc",
        "notification-svc",
    ] {
        let env = &services[svc]["environment"];
        let role = svc.replace("-svc", "_svc");
        for (var, scheme) in [("AMQP_URL", "amqp"), ("DATABASE_URL", "postgres")] {
            let url = env[var].as_str().unwrap_or_default();
            assert!(
                url.starts_with(&format!("{scheme}://{role}@")),
                "{svc}: {var} is {url:?}, not its own user without a password"
            );
        }
        producers.push(format!("{svc}={role}"));
        let own = format!("secrets-{svc}");
        let mut readers = mounted
            .iter()
            .find(|(volume, _)| volume.ends_with(&own))
            .map(|(_, readers)| readers.clone())
            .unwrap_or_default();
        readers.sort();
        assert_eq!(
            readers,
            vec![svc.to_owned(), "secrets".to_owned()],
            "{own} is mounted by {readers:?}"
        );
        assert_eq!(
            services[svc]["entrypoint"],
            serde_json::json!(["saga-compose", "run"]),
            "{svc}"
        );
    }
    assert_eq!(
        services["order-svc"]["environment"]["PRODUCER_USERS"],
        producers.join(","),
    );
    assert_eq!(
        services["broker-setup"]["command"],
        serde_json::json!(["saga-compose", "broker-setup"])
    );

    // The image runs as an unprivileged user.
    let dockerfile = std::fs::read_to_string(repo_file("Dockerfile")).expect("Dockerfile");
    let user = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .expect("the Dockerfile names a USER");
    assert!(!matches!(user.trim(), "root" | "0" | "0:0"), "USER {user}");

    // Issue 24, item 11: the broker refuses bodies over the services' limit
    // before a consumer holds them.
    let conf = bind_source(rabbitmq, "rabbitmq", "/etc/rabbitmq/conf.d/20-saga.conf");
    let conf = std::fs::read_to_string(conf).expect("rabbitmq conf");
    assert!(
        conf.lines().any(|l| l.trim()
            == format!(
                "max_message_size = {}",
                common::messaging::judge::MAX_BODY_BYTES
            )),
        "{conf}"
    );

    // The scripts the containers run parse.
    for script in [
        "deploy/compose/saga-compose.sh",
        "deploy/compose/db-passwords.sh",
        "deploy/compose/rabbitmq-entrypoint.sh",
    ] {
        run_ok(Command::new("sh").arg("-n").arg(repo_file(script)), "sh -n");
    }

    // The development override turns development mode on, by name.
    let dev = compose_model(&["compose.dev.yaml"]);
    assert_eq!(
        dev["services"]["payment-svc"]["environment"]["DEV_MODE"],
        "1"
    );
}
