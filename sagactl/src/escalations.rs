//! `escalations list|retry`: every service's `/admin/escalations`.

use serde_json::{Map, Value, json};

use crate::api::{Api, services};
use crate::failure::{self, Failure};
use crate::output::{Table, cut, print_json, text};

/// `escalations list`: every service's (or one's), oldest first per
/// service. A service that cannot be asked is reported on stderr, the others
/// are still listed, and the exit code is non-zero.
pub async fn list(
    api: &Api,
    service: Option<&str>,
    status: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let status = status.map(|s| s.trim().to_ascii_lowercase());
    if let Some(s) = &status
        && !["open", "retrying", "resolved"].contains(&s.as_str())
    {
        return Err(Failure::Usage("--status must be open, retrying or resolved".into()).into());
    }
    let q = crate::api::query(&[("status", status)]);
    let mut rows = Vec::new();
    let mut failures: Vec<(String, anyhow::Error)> = Vec::new();
    for svc in services(service)? {
        let outcome = async {
            let reply = api.get(&svc, &format!("/admin/escalations{q}")).await?;
            let body = api.expect_ok(reply, &svc, "listing escalations")?;
            match body {
                Value::Array(list) => Ok(list),
                other => Err(anyhow::anyhow!(
                    "{}'s escalation list is not a list: {}",
                    svc.name,
                    cut(&other.to_string(), 200)
                )),
            }
        }
        .await;
        match outcome {
            Ok(list) => {
                for mut row in list {
                    if let Value::Object(map) = &mut row {
                        map.insert("service".into(), Value::from(svc.name));
                    }
                    rows.push(row);
                }
            }
            Err(error) => failures.push((svc.name.to_owned(), error)),
        }
    }

    if json {
        let unavailable: Map<String, Value> = failures
            .iter()
            .map(|(name, e)| (name.clone(), Value::from(format!("{e:#}"))))
            .collect();
        print_json(&json!({"escalations": rows, "unavailable": unavailable}));
    } else if rows.is_empty() {
        if failures.is_empty() {
            println!("no escalations");
        }
    } else {
        let mut t = Table::new(&[
            "service",
            "id",
            "step",
            "order_id",
            "status",
            "attempts",
            "updated",
            "last error",
        ]);
        for r in &rows {
            let g = |k: &str| text(r.get(k));
            t.row(vec![
                g("service"),
                g("id"),
                g("step"),
                g("order_id"),
                g("status"),
                g("attempts"),
                g("updated_at"),
                cut(&g("last_error"), 80),
            ]);
        }
        println!("{}", t.render(""));
    }
    match failures.len() {
        0 => Ok(()),
        1 => {
            let (_, error) = failures.remove(0);
            Err(error)
        }
        n => {
            for (_, error) in &failures {
                eprintln!("sagactl: {error:#}");
            }
            // Refused everywhere: the token is the problem.
            let all_refused = failures
                .iter()
                .all(|(_, e)| failure::exit_code(e) == Failure::EXIT_REFUSED);
            if all_refused {
                Err(Failure::Refused(format!(
                    "{n} services refused the token: escalations need the admin token"
                ))
                .into())
            } else {
                Err(anyhow::anyhow!("{n} services could not be asked"))
            }
        }
    }
}

/// `escalations retry ID`: asks the service that recorded it (each in turn
/// unless `--service` names it) to retry the compensation.
pub async fn retry(api: &Api, id: &str, service: Option<&str>, json: bool) -> anyhow::Result<()> {
    let id = uuid::Uuid::parse_str(id.trim())
        .map_err(|_| Failure::Usage(format!("{id:?} is not an escalation id (a UUID)")))?;
    let mut unreachable: Vec<String> = Vec::new();
    for svc in services(service)? {
        let reply = match api
            .post(&svc, &format!("/admin/escalations/{id}/retry"), None, &[])
            .await
        {
            Ok(reply) => reply,
            Err(error) => {
                unreachable.push(format!("{error:#}"));
                continue;
            }
        };
        match reply.status {
            200..=299 => {
                if json {
                    let mut body = reply.body;
                    if let Value::Object(map) = &mut body {
                        map.insert("service".into(), Value::from(svc.name));
                    }
                    print_json(&body);
                } else {
                    println!(
                        "escalation {id} ({}): retrying; `sagactl escalations list` shows when it \
                         is resolved",
                        svc.name
                    );
                }
                return Ok(());
            }
            // Not this service's (or, when named, unknown there).
            404 if service.is_none() => continue,
            409 => {
                return Err(anyhow::anyhow!(
                    "escalation {id} ({}): {}",
                    svc.name,
                    reply
                        .message()
                        .unwrap_or_else(|| "already resolved".to_owned())
                ));
            }
            _ => {
                let error = api.refusal(&reply, &svc, &format!("retrying escalation {id}"));
                if failure::exit_code(&error) == Failure::EXIT_REFUSED || service.is_some() {
                    return Err(error);
                }
                unreachable.push(format!("{error:#}"));
            }
        }
    }
    if unreachable.is_empty() {
        Err(Failure::NotFound(format!("no escalation {id} at any service")).into())
    } else {
        Err(anyhow::anyhow!(
            "escalation {id} not found at the services that answered; could not ask: {}",
            unreachable.join("; ")
        ))
    }
}
