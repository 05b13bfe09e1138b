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
    /// The card gateway's 3-D Secure answers: its own token (or the admin's).
    Gateway,
}

/// The card gateway's callbacks (payment-svc), which its token opens.
const GATEWAY_ROUTES: [&str; 2] = [
    "/payments/{order_id}/confirm",
    "/payments/{order_id}/decline",
];

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
    } else if GATEWAY_ROUTES.contains(&route) {
        Access::Gateway
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
    /// The card gateway's, if set: it opens its callbacks and nothing else.
    gateway: Option<[u8; 32]>,
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
                gateway: None,
            }),
        })
    }

    /// With the card gateway's token (`GATEWAY_TOKEN`), which may only
    /// answer 3-D Secure: at least [`MIN_TOKEN_LEN`] characters, unlike the
    /// others, and only with them.
    pub fn with_gateway(mut self, gateway: Option<&Secret>) -> Result<Self, String> {
        let Some(gateway) = gateway.map(Secret::expose) else {
            return Ok(self);
        };
        let Some(tokens) = &mut self.tokens else {
            return Err("GATEWAY_TOKEN needs API_TOKEN and ADMIN_TOKEN too".to_owned());
        };
        if gateway.chars().count() < MIN_TOKEN_LEN {
            return Err(format!(
                "GATEWAY_TOKEN must be at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
            ));
        }
        let gateway = digest(gateway);
        if gateway == tokens.api || gateway == tokens.admin {
            return Err("GATEWAY_TOKEN must differ from API_TOKEN and ADMIN_TOKEN".to_owned());
        }
        tokens.gateway = Some(gateway);
        Ok(self)
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
        let is_gateway = tokens
            .gateway
            .is_some_and(|gateway| bool::from(presented.ct_eq(&gateway)));
        match access {
            Access::Admin if is_admin => Ok(()),
            Access::Api if is_admin || is_api => Ok(()),
            Access::Gateway if is_admin || is_gateway => Ok(()),
            // A known token, on an endpoint it does not open.
            Access::Admin if is_api || is_gateway => {
                Err(AuthError::Forbidden("this endpoint needs the admin token"))
            }
            Access::Api if is_gateway => Err(AuthError::Forbidden(
                "this endpoint needs the API token or the admin token",
            )),
            Access::Gateway if is_api => Err(AuthError::Forbidden(
                "this endpoint needs the gateway's token or the admin token",
            )),
            _ => Err(AuthError::Unauthenticated),
        }
    }
}

enum AuthError {
    Unauthenticated,
    /// A known token on an endpoint it does not open: what it needs.
    Forbidden(&'static str),
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
            AuthError::Forbidden(needs) => {
                (StatusCode::FORBIDDEN, Json(ErrorBody::new(needs))).into_response()
            }
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
            Err(AuthError::Forbidden(_))
        ));
        assert!(auth.judge(Access::Admin, Some(ADMIN)).is_ok());
    }

    /// Issue 24: the gateway's 3-D Secure callbacks needed the full admin
    /// token. Its own token opens them, and nothing else.
    #[test]
    fn the_gateway_token_opens_its_callbacks_only() {
        const GATEWAY: &str = "gateway-token-for-3ds-callbacks";
        let auth = HttpAuth::new(Some(&secret(API)), Some(&secret(ADMIN)))
            .unwrap()
            .with_gateway(Some(&secret(GATEWAY)))
            .unwrap();
        assert_eq!(
            required_access("/payments/{order_id}/confirm"),
            Access::Gateway
        );
        assert_eq!(
            required_access("/payments/{order_id}/decline"),
            Access::Gateway
        );
        assert_eq!(required_access("/payments/{order_id}"), Access::Admin);
        assert!(auth.judge(Access::Gateway, Some(GATEWAY)).is_ok());
        assert!(auth.judge(Access::Gateway, Some(ADMIN)).is_ok());
        for (access, token) in [
            (Access::Gateway, API),
            (Access::Admin, GATEWAY),
            (Access::Api, GATEWAY),
        ] {
            assert!(
                matches!(
                    auth.judge(access, Some(token)),
                    Err(AuthError::Forbidden(_))
                ),
                "{access:?}"
            );
        }
        assert!(matches!(
            auth.judge(Access::Gateway, None),
            Err(AuthError::Unauthenticated)
        ));
        // Without its own token, the gateway uses the admin's, as before.
        let plain = HttpAuth::new(Some(&secret(API)), Some(&secret(ADMIN))).unwrap();
        assert!(plain.judge(Access::Gateway, Some(ADMIN)).is_ok());
        assert!(
            HttpAuth::new(Some(&secret(API)), Some(&secret(ADMIN)))
                .unwrap()
                .with_gateway(Some(&secret(ADMIN)))
                .is_err()
        );
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
