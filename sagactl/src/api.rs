//! The services' HTTP APIs: requests with the bearer token, and answers
//! mapped to clear errors with their exit codes.

use std::time::Duration;

use anyhow::Context as _;
use common::messaging::topology::{
    INVENTORY_SVC, NOTIFICATION_SVC, ORDER_SVC, PAYMENT_SVC, SERVICES, ServiceIdentity,
};
use serde_json::Value;

use crate::failure::Failure;

/// The services' base URLs.
#[derive(Debug, Clone)]
pub struct Urls {
    pub order: String,
    pub payment: String,
    pub inventory: String,
    pub notification: String,
}

/// A client of the four services.
pub struct Api {
    http: reqwest::Client,
    urls: Urls,
    token: Option<String>,
}

/// An answer: its status and body (JSON if it parsed, else the text as a
/// JSON string, `null` if empty).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    /// The `error` field of an error body, or the body as text.
    pub fn message(&self) -> Option<String> {
        match &self.body {
            Value::Null => None,
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => Some(s.trim().to_owned()),
            body => body
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| Some(body.to_string())),
        }
    }
}

impl Api {
    pub fn new(urls: Urls, token: Option<String>, timeout: Duration) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        let token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        Ok(Api { http, urls, token })
    }

    /// The base URL of a service.
    pub fn url(&self, service: &ServiceIdentity) -> &str {
        let url = match service.name {
            n if n == PAYMENT_SVC.name => &self.urls.payment,
            n if n == INVENTORY_SVC.name => &self.urls.inventory,
            n if n == NOTIFICATION_SVC.name => &self.urls.notification,
            _ => &self.urls.order,
        };
        url.trim_end_matches('/')
    }

    pub fn order_svc(&self) -> ServiceIdentity {
        ORDER_SVC
    }

    pub async fn get(
        &self,
        service: &ServiceIdentity,
        path_and_query: &str,
    ) -> anyhow::Result<Reply> {
        let url = format!("{}{path_and_query}", self.url(service));
        self.send(self.http.get(&url), service, &url).await
    }

    pub async fn post(
        &self,
        service: &ServiceIdentity,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let url = format!("{}{path}", self.url(service));
        let mut request = self.http.post(&url);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request, service, &url).await
    }

    async fn send(
        &self,
        mut request: reqwest::RequestBuilder,
        service: &ServiceIdentity,
        url: &str,
    ) -> anyhow::Result<Reply> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| {
            let why = if e.is_timeout() {
                "timed out".to_owned()
            } else if e.is_connect() {
                "cannot connect".to_owned()
            } else {
                e.to_string()
            };
            anyhow::anyhow!("{} at {url}: {why}", service.name)
        })?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading {}'s answer from {url}", service.name))?;
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Reply { status, body })
    }

    /// The body of a 2xx answer; any other status as an error with its
    /// exit code (`what` says what was asked, for the message).
    pub fn expect_ok(
        &self,
        reply: Reply,
        service: &ServiceIdentity,
        what: &str,
    ) -> anyhow::Result<Value> {
        if (200..300).contains(&reply.status) {
            return Ok(reply.body);
        }
        Err(self.refusal(&reply, service, what))
    }

    /// The error for a non-2xx answer.
    pub fn refusal(&self, reply: &Reply, service: &ServiceIdentity, what: &str) -> anyhow::Error {
        let name = service.name;
        let message = reply.message();
        let said = message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        match reply.status {
            401 => Failure::Refused(if self.token.is_some() {
                format!("{name} refused the token (401{said}): check --token / SAGA_API_TOKEN")
            } else {
                format!("{name} needs a token (401{said}): pass --token or set SAGA_API_TOKEN")
            })
            .into(),
            403 => Failure::Refused(format!(
                "{name} refused the token for {what} (403{said}): this needs the admin token \
                 (ADMIN_TOKEN) in --token / SAGA_API_TOKEN"
            ))
            .into(),
            404 => Failure::NotFound(match message {
                Some(m) => format!("{what}: {m}"),
                None => format!("{what}: {name} answered 404 (not found)"),
            })
            .into(),
            400 | 422 => Failure::Usage(format!("{name} refused {what} as invalid{said}")).into(),
            503 => anyhow::anyhow!("{name} is unavailable (503{said}); retry later"),
            status => anyhow::anyhow!("{name} answered {status} to {what}{said}"),
        }
    }
}

/// A service by name: `payment-svc`, or just `payment`.
pub fn service_named(name: &str) -> anyhow::Result<ServiceIdentity> {
    let wanted = name.trim().to_ascii_lowercase();
    SERVICES
        .iter()
        .find(|s| s.name == wanted || s.name.strip_suffix("-svc") == Some(wanted.as_str()))
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = SERVICES.iter().map(|s| s.name).collect();
            Failure::Usage(format!(
                "unknown service {name:?}: one of {}",
                names.join(", ")
            ))
            .into()
        })
}

/// The services `--service` names, or all four.
pub fn services(name: Option<&str>) -> anyhow::Result<Vec<ServiceIdentity>> {
    match name {
        Some(name) => Ok(vec![service_named(name)?]),
        None => Ok(SERVICES.to_vec()),
    }
}

/// Percent-encodes a query or path value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `?k=v&…` of the pairs with a value (empty if none has).
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_found_by_full_or_short_name() {
        assert_eq!(service_named("payment-svc").unwrap().name, "payment-svc");
        assert_eq!(service_named("Inventory").unwrap().name, "inventory-svc");
        let err = service_named("bank").unwrap_err();
        assert_eq!(crate::failure::exit_code(&err), 2);
    }

    #[test]
    fn queries_are_encoded() {
        assert_eq!(
            query(&[
                ("status", Some("FAILED".into())),
                ("since", Some("2026-01-01T00:00:00+01:00".into())),
                ("limit", None),
            ]),
            "?status=FAILED&since=2026-01-01T00%3A00%3A00%2B01%3A00"
        );
        assert_eq!(query(&[("limit", None)]), "");
    }
}
