//! `docs/asyncapi.yaml` as an outside reader gets it: every routing key is
//! a channel and every producer and consumer an operation (read from the
//! YAML text), and the official AsyncAPI parser (`@asyncapi/parser`, from
//! the npm registry, installed in `tests/asyncapi/` by
//! `scripts/test-deps.sh`) finds it valid — $refs to `docs/schemas/`
//! resolved and the payload schemas checked — while it refuses broken
//! copies, so a pass means something.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::messaging::asyncapi::{self, ASYNCAPI_FILE};
use common::messaging::events::EventType;

use crate::schemas::repo;

fn document_text() -> String {
    std::fs::read_to_string(repo().join(ASYNCAPI_FILE)).expect("docs/asyncapi.yaml")
}

/// The keys of the top-level mapping `section` (two-space indented keys
/// under it), each with the text of its block.
fn entries(text: &str, section: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('#') && !line.is_empty() {
            inside = line == format!("{section}:");
            continue;
        }
        if !inside {
            continue;
        }
        if let Some(key) = line
            .strip_prefix("  ")
            .filter(|l| !l.starts_with(' '))
            .and_then(|l| l.strip_suffix(':'))
        {
            out.push((key.trim_matches('\'').to_owned(), String::new()));
        } else if let Some((_, block)) = out.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    out
}

#[test]
fn the_asyncapi_document_has_a_channel_for_every_routing_key() {
    let text = document_text();
    let channels = entries(&text, "channels");
    let addresses: BTreeSet<String> = channels
        .iter()
        .filter_map(|(_, block)| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("    address: "))
                .map(str::to_owned)
        })
        .collect();
    for event in EventType::ALL {
        assert!(
            addresses.contains(event.routing_key()),
            "{ASYNCAPI_FILE} has no channel with address {}: regenerate it \
             (cargo test -p common --lib -- --ignored write_schemas write_asyncapi)",
            event.routing_key()
        );
    }
    // The reply channel: its address is each request's `reply_to`.
    assert!(
        channels
            .iter()
            .any(|(k, b)| k == asyncapi::REPLY && b.contains("    address: null"))
    );
    // Every event channel is bound to the durable topic exchange.
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let exchange = lines
        .iter()
        .position(|l| *l == "name: saga.events")
        .expect("the exchange's binding");
    assert_eq!(
        lines[exchange + 1..exchange + 3],
        ["type: topic", "durable: true"]
    );
    for (key, block) in channels.iter().filter(|(k, _)| k != asyncapi::REPLY) {
        assert!(
            block.contains("$ref: '#/components/channelBindings/saga.events'"),
            "channel {key} is not bound to saga.events"
        );
    }
}

#[test]
fn the_asyncapi_operations_are_who_sends_and_receives_each_key() {
    let text = document_text();
    let listed: BTreeSet<String> = entries(&text, "operations")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let expected: BTreeSet<String> = asyncapi::expected_operations()
        .into_iter()
        .map(|(party, verb, event)| asyncapi::operation_id(&party, verb, event.routing_key()))
        .collect();
    assert_eq!(
        listed, expected,
        "{ASYNCAPI_FILE}'s operations are not the choreography's"
    );
    // Spot checks against docs/events.md's table.
    for op in [
        "client.sends.order.requested",
        "order-svc.receives.order.requested",
        "payment-svc.receives.order.created",
        "inventory-svc.receives.payment.completed",
        "order-svc.observes.inventory.reserved",
        "notification-svc.receives.order.cancelled",
        "inventory-svc.sends.inventory.backordered",
        "order-svc.sends.order.cancelled",
    ] {
        assert!(listed.contains(op), "{op}");
    }
}

/// `tests/asyncapi/`, where the validator and its node_modules live.
fn validator_dir() -> PathBuf {
    repo().join("tests/asyncapi")
}

/// Runs the AsyncAPI parser on `file`: (passed, its output).
fn run_validator(file: &Path) -> (bool, String) {
    let dir = validator_dir();
    assert!(
        dir.join("node_modules/@asyncapi/parser").is_dir(),
        "the AsyncAPI parser is not installed in {}: run scripts/test-deps.sh",
        dir.display()
    );
    let out = Command::new("node")
        .arg(dir.join("validate.mjs"))
        .arg("--strict")
        .arg(file)
        .current_dir(&dir)
        .output()
        .expect("node runs (scripts/test-deps.sh installs Node.js)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_asyncapi_document_is_valid_for_the_asyncapi_parser() {
    let (ok, out) = run_validator(&repo().join(ASYNCAPI_FILE));
    assert!(ok, "{ASYNCAPI_FILE} is not valid AsyncAPI:\n{out}");
    assert!(out.contains("VALID:"), "{out}");
    assert!(out.contains("AsyncAPI 3.0.0"), "{out}");
}

/// A copy of the document, changed by `edit`, next to a copy of
/// `docs/schemas/` (its $refs are relative).
fn broken_copy(name: &str, edit: impl FnOnce(String) -> String) -> (tempdir::Dir, PathBuf) {
    let dir = tempdir::Dir::new(name);
    let schemas = dir.path().join("schemas");
    std::fs::create_dir_all(&schemas).unwrap();
    for entry in std::fs::read_dir(repo().join("docs/schemas")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), schemas.join(entry.file_name())).unwrap();
    }
    let file = dir.path().join("asyncapi.yaml");
    let edited = edit(document_text());
    std::fs::write(&file, edited).unwrap();
    (dir, file)
}

#[test]
fn the_asyncapi_validator_refuses_broken_documents() {
    // The copy as it is passes: what fails below is the change alone.
    let (_d, same) = broken_copy("same", |t| t);
    let (ok, out) = run_validator(&same);
    assert!(ok, "{out}");

    // An action the spec does not have.
    let (_d, file) = broken_copy("action", |t| {
        t.replacen("action: send", "action: publish", 1)
    });
    let (ok, out) = run_validator(&file);
    assert!(!ok, "a wrong action passed:\n{out}");
    assert!(out.contains("action"), "{out}");

    // A payload $ref to a schema that does not exist: refs are resolved.
    let (_d, file) = broken_copy("ref", |t| {
        t.replacen("./schemas/order.result.json", "./schemas/missing.json", 1)
    });
    let (ok, out) = run_validator(&file);
    assert!(!ok, "a dangling $ref passed:\n{out}");
    assert!(out.contains("missing.json"), "{out}");

    // A payload schema that is not a schema: the referenced files are
    // checked too.
    let (d, file) = broken_copy("schema", |t| t);
    let envelope = d.path().join("schemas/envelope.json");
    let text = std::fs::read_to_string(&envelope).unwrap();
    let broken = text.replacen("\"type\": \"object\"", "\"type\": \"objekt\"", 1);
    assert_ne!(text, broken);
    std::fs::write(&envelope, broken).unwrap();
    let (ok, out) = run_validator(&file);
    assert!(!ok, "an invalid payload schema passed:\n{out}");
}

/// A temporary directory removed when dropped.
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(name: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "saga-asyncapi-{name}-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
