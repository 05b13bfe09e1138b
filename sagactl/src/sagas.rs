//! `order place`, `saga show`, `saga list` (order-svc's `/orders` and
//! `/sagas` endpoints).

use std::io::Read as _;

use anyhow::Context as _;
use serde_json::Value;

use crate::api::{Api, query};
use crate::failure::Failure;
use crate::output::{Table, clean, cut, print_json, text};

/// `order place FILE|-`: prints the result dict; exit 5 if it is a failure.
pub async fn place(api: &Api, file: &str, key: Option<&str>) -> anyhow::Result<()> {
    let raw = if file == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading the order from stdin")?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("reading the order from {file}"))?
    };
    let order: Value = serde_json::from_slice(&raw).map_err(|e| {
        let source = if file == "-" { "stdin" } else { file };
        Failure::Usage(format!("the order in {source} is not JSON: {e}"))
    })?;
    let body = serde_json::to_vec(&order).context("encoding the order")?;
    let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
    let svc = api.order_svc();
    let reply = api.post(&svc, "/orders", Some(body), &headers).await?;
    // The result dict: on 200, and on 400 (invalid) / 409 (key reused).
    let is_result = reply.body.get("status").and_then(Value::as_str).is_some();
    if !(is_result && matches!(reply.status, 200 | 400 | 409)) {
        return Err(api.refusal(&reply, &svc, "placing the order"));
    }
    println!("{}", reply.body);
    if reply.body["status"] == "success" {
        Ok(())
    } else {
        Err(Failure::OrderFailed.into())
    }
}

/// `saga show ID`: the timeline and the decision.
pub async fn show(api: &Api, order_id: &str, json: bool) -> anyhow::Result<()> {
    let id = uuid::Uuid::parse_str(order_id.trim())
        .map_err(|_| Failure::Usage(format!("{order_id:?} is not an order id (a UUID)")))?;
    let svc = api.order_svc();
    let what = format!("saga {id}");
    let reply = api.get(&svc, &format!("/sagas/{id}")).await?;
    if reply.status == 404 && reply.message().is_none() {
        return Err(Failure::NotFound(format!(
            "no saga {id} (order-svc answered 404 without a message: if the order exists, this \
             order-svc may not serve GET /sagas/{{order_id}} yet)"
        ))
        .into());
    }
    let saga = api.expect_ok(reply, &svc, &what)?;
    if json {
        print_json(&saga);
    } else {
        println!("{}", render_saga(&saga));
    }
    Ok(())
}

/// A saga as text.
pub fn render_saga(saga: &Value) -> String {
    let f = |k: &str| text(saga.get(k));
    let mut out = format!("saga {}  {}\n", f("order_id"), f("status"));
    out.push_str(&format!(
        "  created {}   deadline {}   decided {}   took {} ms\n",
        f("created_at"),
        f("deadline_at"),
        f("decided_at"),
        f("duration_ms")
    ));
    if let Some(result) = saga.get("result").filter(|r| !r.is_null()) {
        out.push_str(&format!("  result  {}\n", clean(&result.to_string())));
    }

    out.push_str("\ntimeline:\n");
    let steps = saga
        .get("steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if steps.is_empty() {
        out.push_str("  (no steps recorded)\n");
    } else {
        let mut t = Table::new(&[
            "+ms", "Δms", "service", "event", "kind", "outcome", "detail",
        ]);
        for s in &steps {
            let g = |k: &str| text(s.get(k));
            let outcome = match s.get("state").and_then(Value::as_str) {
                Some(state) => format!("{} ({state})", g("outcome")),
                None => g("outcome"),
            };
            t.row(vec![
                g("since_start_ms"),
                g("since_previous_ms"),
                g("service"),
                g("event"),
                g("kind"),
                outcome,
                cut(&g("detail"), 100),
            ]);
        }
        out.push_str(&t.render("  "));
        out.push('\n');
    }

    out.push_str("\ndecision: ");
    match saga.get("decision").filter(|d| d.is_object()) {
        None => out.push_str("none yet (the saga is undecided)\n"),
        Some(d) => {
            let g = |k: &str| text(d.get(k));
            out.push_str(&g("outcome"));
            let mut why = Vec::new();
            for k in ["error", "reason"] {
                if d.get(k).is_some_and(|v| !v.is_null()) {
                    why.push(g(k));
                }
            }
            if !why.is_empty() {
                out.push_str(&format!(" — {}", why.join(": ")));
            }
            if d.get("failed_step").is_some_and(|v| !v.is_null()) {
                out.push_str(&format!(" (failed step: {})", g("failed_step")));
            }
            out.push_str(&format!(" at {}\n", g("at")));
        }
    }

    if let Some(comps) = saga
        .get("compensations")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
    {
        out.push_str("\ncompensations:\n");
        let mut t = Table::new(&["service", "step", "state", "at", "detail"]);
        for c in comps {
            let g = |k: &str| text(c.get(k));
            t.row(vec![
                g("service"),
                g("step"),
                g("state"),
                g("at"),
                cut(&g("detail"), 100),
            ]);
        }
        out.push_str(&t.render("  "));
        out.push('\n');
    }
    if let Some(emails) = saga
        .get("emails")
        .and_then(Value::as_array)
        .filter(|e| !e.is_empty())
    {
        out.push_str("\nemails:\n");
        let mut t = Table::new(&["kind", "sent at"]);
        for e in emails {
            t.row(vec![text(e.get("kind")), text(e.get("sent_at"))]);
        }
        out.push_str(&t.render("  "));
        out.push('\n');
    }
    if let Some(sources) = saga.get("sources").and_then(Value::as_object) {
        let missing: Vec<String> = sources
            .iter()
            .filter(|(_, v)| v.as_str() != Some("ok"))
            .map(|(k, v)| format!("{} {}", clean(k), text(Some(v))))
            .collect();
        if !missing.is_empty() {
            out.push_str(&format!(
                "\nincomplete: {} (their part of the timeline is missing)\n",
                missing.join("; ")
            ));
        }
    }
    out.trim_end().to_owned()
}

/// What `saga list` asks for.
#[derive(Debug, Default)]
pub struct Search {
    pub stuck: bool,
    pub status: Option<String>,
    pub since: Option<String>,
    pub limit: Option<u32>,
}

/// `saga list`: recent sagas, newest first.
pub async fn list(api: &Api, search: &Search, json: bool) -> anyhow::Result<()> {
    let q = query(&[
        (
            "status",
            search
                .status
                .as_ref()
                .map(|s| s.trim().to_ascii_uppercase()),
        ),
        ("since", search.since.clone()),
        ("limit", search.limit.map(|n| n.to_string())),
        ("stuck", search.stuck.then(|| "true".to_owned())),
    ]);
    let svc = api.order_svc();
    let reply = api.get(&svc, &format!("/sagas{q}")).await?;
    let body = api.expect_ok(reply, &svc, "the saga search")?;
    if json {
        print_json(&body);
        return Ok(());
    }
    let sagas = body
        .get("sagas")
        .and_then(Value::as_array)
        .context("order-svc's answer has no \"sagas\" list")?;
    if sagas.is_empty() {
        println!("no sagas");
        return Ok(());
    }
    let mut t = Table::new(&[
        "order_id", "status", "customer", "amount", "ms", "created", "outcome",
    ]);
    for s in sagas {
        let g = |k: &str| text(s.get(k));
        let status = if s.get("stuck").and_then(Value::as_bool) == Some(true) {
            format!("{} (stuck)", g("status"))
        } else {
            g("status")
        };
        let mut outcome = match (s.get("error"), s.get("reason")) {
            (Some(Value::String(e)), Some(Value::String(r))) => {
                format!("{}: {}", clean(e), clean(r))
            }
            (Some(Value::String(e)), _) => clean(e),
            _ => String::new(),
        };
        // Why it is stuck comes first: it is what the operator acts on.
        if let Some(Value::String(why)) = s.get("stuck_reason") {
            outcome = format!("[{}] {outcome}", clean(why));
        }
        t.row(vec![
            g("order_id"),
            status,
            cut(&g("customer_id"), 24),
            cents(s.get("amount_cents")),
            g("duration_ms"),
            g("created_at"),
            cut(&outcome, 80),
        ]);
    }
    println!("{}", t.render(""));
    Ok(())
}

/// `saga list --violations`: invariant violations order-svc found.
pub async fn violations(api: &Api, limit: Option<u32>, json: bool) -> anyhow::Result<()> {
    let q = query(&[("limit", limit.map(|n| n.to_string()))]);
    let svc = api.order_svc();
    let reply = api.get(&svc, &format!("/sagas/violations{q}")).await?;
    // An order-svc without the route takes "violations" for an order id.
    let unserved = (reply.status == 404 && reply.message().is_none())
        || (reply.status == 400 && reply.message().is_some_and(|m| m.contains("order_id")));
    if unserved {
        return Err(anyhow::anyhow!(
            "this order-svc does not serve GET /sagas/violations (an older version?)"
        ));
    }
    let body = api.expect_ok(reply, &svc, "the violations")?;
    if json {
        print_json(&body);
        return Ok(());
    }
    let found = body
        .get("violations")
        .and_then(Value::as_array)
        .context("order-svc's answer has no \"violations\" list")?;
    if found.is_empty() {
        println!("no violations");
        return Ok(());
    }
    let mut t = Table::new(&["order_id", "kind", "found at", "detail"]);
    for v in found {
        let g = |k: &str| text(v.get(k));
        t.row(vec![
            g("order_id"),
            g("kind"),
            g("found_at"),
            cut(&g("detail"), 120),
        ]);
    }
    println!("{}", t.render(""));
    Ok(())
}

/// Cents as `12.34`.
fn cents(v: Option<&Value>) -> String {
    match v.and_then(Value::as_i64) {
        Some(c) => format!(
            "{}{}.{:02}",
            if c < 0 { "-" } else { "" },
            c.abs() / 100,
            c.abs() % 100
        ),
        None => text(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_saga_renders_its_timeline_and_decision() {
        let saga = json!({
            "order_id": "o1", "status": "FAILED", "result": {"status": "failure"},
            "created_at": "t0", "deadline_at": "t5", "decided_at": "t1", "duration_ms": 41,
            "decision": {"outcome": "FAILED", "error": "Payment failed",
                         "reason": "Insufficient funds", "failed_step": "payment", "at": "t1"},
            "steps": [
                {"at": "t0", "service": "order-svc", "event": "order.created", "kind": "action",
                 "outcome": "ok", "detail": null, "state": null, "since_start_ms": 0,
                 "since_previous_ms": 0},
                {"at": "t1", "service": "payment-svc", "event": "payment.refunded",
                 "kind": "compensation", "outcome": "ok", "detail": "line\nbreak",
                 "state": "done", "since_start_ms": 40, "since_previous_ms": 40}
            ],
            "compensations": [], "emails": [{"kind": "order_failed", "sent_at": "t2"}],
            "sources": {"order-svc": "ok", "payment-svc": "unavailable: timeout"}
        });
        let out = render_saga(&saga);
        assert!(out.contains("saga o1  FAILED"), "{out}");
        assert!(out.contains("payment.refunded"), "{out}");
        assert!(out.contains("ok (done)"), "{out}");
        assert!(out.contains("line\\nbreak"), "{out}");
        assert!(
            out.contains(
                "decision: FAILED — Payment failed: Insufficient funds (failed step: payment) at t1"
            ),
            "{out}"
        );
        assert!(out.contains("payment-svc unavailable: timeout"), "{out}");
        assert!(out.contains("order_failed"), "{out}");
    }

    #[test]
    fn amounts_are_shown_in_units() {
        assert_eq!(cents(Some(&json!(3700))), "37.00");
        assert_eq!(cents(Some(&json!(5))), "0.05");
        assert_eq!(cents(None), "-");
    }
}
