//! Who may call which HTTP endpoint: two bearer tokens.
//!
//! | access | endpoints | token |
//! |---|---|---|
//! | open | `/health`, `/metrics`, `/openapi.json`, the Saga Explorer's static page (`/explorer`, its JS, CSS and icon) | none |
//! | api | `/orders…`, `/sagas…` (placing and reading orders and sagas) | `API_TOKEN` or `ADMIN_TOKEN` |
//! | admin | everything else: every set-up `PUT`, every read of accounts, stock, customers and emails, `/admin/…` | `ADMIN_TOKEN` |
//!
//! Sent as `Authorization: Bearer <token>`; compared in constant time (of
//! their SHA-256 digests, so not even the length leaks). No token or a wrong
//! one: 401; the API token on an admin endpoint: 403. With neither token
//! configured the service runs open, for local development only: it says so
//! at start-up and in `/health` (`"auth": "disabled"`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::runtime::openapi::ErrorBody;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

/// Tokens shorter than this are refused at start-up.
pub const MIN_TOKEN_LEN: usize = 16;

/// A secret from the configuration: never shown by `Debug`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.trim().to_owned()))
    }
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Api,
    Admin,
}

/// The Saga Explorer's static files (order-svc): the page loads without a
/// token, and asks for one when its data calls (`/sagas…`, api) answer 401.
/// Exact paths, so nothing else under `/explorer` is opened by accident.
const EXPLORER_PAGE: [&str; 5] = [
    "/explorer",
    "/explorer/",
    "/explorer/app.js",
    "/explorer/style.css",
    "/explorer/favicon.svg",
];

/// The access an endpoint (its route pattern, or the raw path of a request
/// no route matched) needs.
pub fn required_access(route: &str) -> Access {
    let under = |prefix: &str| {
        route == prefix
            || route
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/') || rest.starts_with('?'))
    };
    if ["/health", "/metrics", "/openapi.json"].contains(&route) || EXPLORER_PAGE.contains(&route) {
        Access::Open
    } else if under("/orders") || under("/sagas") {
        Access::Api
    } else {
        Access::Admin
    }
}

/// The configured tokens (as digests), or none: auth disabled.
#[derive(Clone)]
pub struct HttpAuth {
    tokens: Option<Tokens>,
}

#[derive(Clone)]
struct Tokens {
    api: [u8; 32],
    admin: [u8; 32],
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl HttpAuth {
    /// Both tokens or neither; each at least [`MIN_TOKEN_LEN`] characters,
    /// and different.
    pub fn new(api: Option<&Secret>, admin: Option<&Secret>) -> Result<Self, String> {
        let (api, admin) = match (api, admin) {
            (None, None) => return Ok(Self { tokens: None }),
            (Some(api), Some(admin)) => (api.expose(), admin.expose()),
            _ => return Err("set both API_TOKEN and ADMIN_TOKEN, or neither".to_owned()),
        };
        for (name, token) in [("API_TOKEN", api), ("ADMIN_TOKEN", admin)] {
            if token.chars().count() < MIN_TOKEN_LEN {
                return Err(format!(
                    "{name} must be at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
                ));
            }
        }
        if api == admin {
            return Err("API_TOKEN and ADMIN_TOKEN must differ".to_owned());
        }
        Ok(Self {
            tokens: Some(Tokens {
                api: digest(api),
                admin: digest(admin),
            }),
        })
    }

    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// What a request with `presented` (the bearer token, if any) may do
    /// on an endpoint needing `access`.
    fn judge(&self, access: Access, presented: Option<&str>) -> Result<(), AuthError> {
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        if access == Access::Open {
            return Ok(());
        }
        let presented = digest(presented.ok_or(AuthError::Unauthenticated)?);
        let is_admin = bool::from(presented.ct_eq(&tokens.admin));
        let is_api = bool::from(presented.ct_eq(&tokens.api));
        match access {
            Access::Admin if is_admin => Ok(()),
            Access::Admin if is_api => Err(AuthError::Forbidden),
            Access::Api if is_admin || is_api => Ok(()),
            _ => Err(AuthError::Unauthenticated),
        }
    }
}

enum AuthError {
    Unauthenticated,
    Forbidden,
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        match self {
            AuthError::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(ErrorBody::new("missing or invalid bearer token")),
            )
                .into_response(),
            AuthError::Forbidden => (
                StatusCode::FORBIDDEN,
                Json(ErrorBody::new("this endpoint needs the admin token")),
            )
                .into_response(),
        }
    }
}

/// Middleware: refuses requests without the token their endpoint needs.
pub async fn require_token(
    State(auth): State<Arc<HttpAuth>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match auth.judge(required_access(&route), presented) {
        Ok(()) => next.run(req).await,
        Err(refusal) => refusal.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        s.parse().unwrap()
    }

    const API: &str = "api-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789";

    #[test]
    fn endpoints_are_classified_by_route() {
        assert_eq!(required_access("/health"), Access::Open);
        assert_eq!(required_access("/metrics"), Access::Open);
        assert_eq!(required_access("/openapi.json"), Access::Open);
        assert_eq!(required_access("/openapi.json/x"), Access::Admin);
        assert_eq!(required_access("/orders"), Access::Api);
        assert_eq!(required_access("/orders/{order_id}"), Access::Api);
        assert_eq!(required_access("/sagas"), Access::Api);
        assert_eq!(required_access("/ordersx"), Access::Admin);
        assert_eq!(required_access("/accounts/{customer_id}"), Access::Admin);
        assert_eq!(required_access("/catalog/{item_id}"), Access::Admin);
        assert_eq!(required_access("/admin/escalations"), Access::Admin);
        assert_eq!(required_access("/health/x"), Access::Admin);
        assert_eq!(required_access("/explorer"), Access::Open);
        assert_eq!(required_access("/explorer/app.js"), Access::Open);
        assert_eq!(required_access("/explorer/style.css"), Access::Open);
        assert_eq!(required_access("/explorer/other"), Access::Admin);
        assert_eq!(required_access("/explorerx"), Access::Admin);
        assert_eq!(required_access("/sagas/stats"), Access::Api);
    }

    #[test]
    fn tokens_open_what_they_should_and_nothing_else() {
        let auth = HttpAuth::new(Some(&secret(API)), Some(&secret(ADMIN))).unwrap();
        assert!(auth.enabled());
        assert!(auth.judge(Access::Open, None).is_ok());
        assert!(matches!(
            auth.judge(Access::Api, None),
            Err(AuthError::Unauthenticated)
        ));
        assert!(matches!(
            auth.judge(Access::Api, Some("nope")),
            Err(AuthError::Unauthenticated)
        ));
        assert!(auth.judge(Access::Api, Some(API)).is_ok());
        assert!(auth.judge(Access::Api, Some(ADMIN)).is_ok());
        assert!(matches!(
            auth.judge(Access::Admin, Some(API)),
            Err(AuthError::Forbidden)
        ));
        assert!(auth.judge(Access::Admin, Some(ADMIN)).is_ok());
    }

    #[test]
    fn without_tokens_everything_is_open() {
        let auth = HttpAuth::new(None, None).unwrap();
        assert!(!auth.enabled());
        assert!(auth.judge(Access::Admin, None).is_ok());
    }

    #[test]
    fn weak_or_partial_token_settings_are_refused() {
        assert!(HttpAuth::new(Some(&secret(API)), None).is_err());
        assert!(HttpAuth::new(None, Some(&secret(ADMIN))).is_err());
        assert!(HttpAuth::new(Some(&secret("short")), Some(&secret(ADMIN))).is_err());
        assert!(HttpAuth::new(Some(&secret(ADMIN)), Some(&secret(ADMIN))).is_err());
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        assert_eq!(format!("{:?}", secret(ADMIN)), "Secret(***)");
    }
}
