//! Who may call which HTTP endpoint: two bearer tokens.
//!
//! | access | endpoints | token |
//! |---|---|---|
//! | open | `/health`, `/metrics`, `/openapi.json`, the Saga Explorer's static page (`/explorer`, its JS, CSS and icon) | none |
//! | api | `/orders…`, `/sagas…` (placing and reading orders and sagas) | `API_TOKEN`, a named client's token (`API_CLIENTS`) or `ADMIN_TOKEN` |
//! | admin | everything else: every set-up `PUT`, every read of accounts, stock, customers and emails, `/admin/…` | `ADMIN_TOKEN` |
//!
//! Sent as `Authorization: Bearer <token>`; compared in constant time (of
//! their SHA-256 digests, so not even the length leaks). No token or a wrong
//! one: 401; the API token on an admin endpoint: 403. With neither token
//! configured the service runs open, for local development only: it says so
//! at start-up and in `/health` (`"auth": "disabled"`).
//!
//! Each request carries who made it ([`ApiClient`]): a named API client
//! (`API_CLIENTS=shop=<token>,partner=<token>`), each with its own token
//! and its own idempotency keys, or one of `api`, `admin`, `gateway`
//! (`anonymous` with auth disabled). Customers are not authenticated here:
//! that belongs to the gateway in front of order-svc, which calls it as one
//! of these clients.

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

/// Who made a request, by its token (in the request's extensions once the
/// token is checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiClient(Arc<str>);

impl ApiClient {
    /// The built-in identities: their idempotency keys share one scope
    /// (with AMQP clients').
    const BUILT_IN: [&'static str; 4] = ["api", "admin", "gateway", "anonymous"];

    fn named(name: &str) -> ApiClient {
        ApiClient(Arc::from(name))
    }

    /// A request no token was checked for (auth disabled).
    pub fn anonymous() -> ApiClient {
        ApiClient::named("anonymous")
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `key` as stored: a named client's keys are its own (another client
    /// never finds, replays or squats them); the built-in identities' are
    /// as given. The separator cannot be in a key (no control characters).
    pub fn scoped_key(&self, key: &str) -> String {
        if Self::BUILT_IN.contains(&self.name()) {
            key.to_owned()
        } else {
            format!("{}\u{1f}{key}", self.name())
        }
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
    /// Named API clients (`API_CLIENTS`): each opens what the API token
    /// opens, as itself.
    clients: Vec<([u8; 32], ApiClient)>,
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
                clients: Vec::new(),
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

    /// With named API clients: `spec` is `name=token,name=token…`
    /// (`API_CLIENTS`); names of lowercase letters, digits, `-` and `_`
    /// (not `api`, `admin`, `gateway`, `anonymous`), tokens of at least
    /// [`MIN_TOKEN_LEN`] characters, all different.
    pub fn with_clients(mut self, spec: Option<&Secret>) -> Result<Self, String> {
        let Some(spec) = spec.map(Secret::expose).filter(|s| !s.trim().is_empty()) else {
            return Ok(self);
        };
        let Some(tokens) = &mut self.tokens else {
            return Err("API_CLIENTS needs API_TOKEN and ADMIN_TOKEN too".to_owned());
        };
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, token) = entry
                .split_once('=')
                .ok_or("API_CLIENTS entries must be name=token")?;
            let name = name.trim();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
                || ApiClient::BUILT_IN.contains(&name)
            {
                return Err(format!(
                    "API_CLIENTS: {name:?} is not a client name (lowercase letters, digits, - and _; \
                     not api, admin, gateway or anonymous)"
                ));
            }
            if token.trim().chars().count() < MIN_TOKEN_LEN {
                return Err(format!(
                    "API_CLIENTS: the token of {name} must be at least {MIN_TOKEN_LEN} characters"
                ));
            }
            let token = digest(token.trim());
            let taken = token == tokens.api
                || token == tokens.admin
                || tokens.gateway == Some(token)
                || tokens.clients.iter().any(|(t, _)| *t == token);
            if taken || tokens.clients.iter().any(|(_, c)| c.name() == name) {
                return Err(format!(
                    "API_CLIENTS: {name} repeats a name or another's token"
                ));
            }
            tokens.clients.push((token, ApiClient::named(name)));
        }
        Ok(self)
    }

    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// What a request with `presented` (the bearer token, if any) may do
    /// on an endpoint needing `access`.
    fn judge(&self, access: Access, presented: Option<&str>) -> Result<ApiClient, AuthError> {
        let Some(tokens) = &self.tokens else {
            return Ok(ApiClient::named("anonymous"));
        };
        let presented = presented.map(digest);
        let is = |token: &[u8; 32]| presented.is_some_and(|p| bool::from(p.ct_eq(token)));
        let (is_admin, is_api) = (is(&tokens.admin), is(&tokens.api));
        let is_gateway = tokens.gateway.as_ref().is_some_and(is);
        // Every named client's token is compared (constant time whichever
        // it is).
        let client = tokens.clients.iter().fold(
            None,
            |found, (token, client)| if is(token) { Some(client) } else { found },
        );
        let who = if is_admin {
            ApiClient::named("admin")
        } else if is_api {
            ApiClient::named("api")
        } else if is_gateway {
            ApiClient::named("gateway")
        } else if let Some(client) = client {
            client.clone()
        } else {
            ApiClient::named("anonymous")
        };
        let is_api_client = is_api || client.is_some();
        match access {
            Access::Open => Ok(who),
            Access::Admin if is_admin => Ok(who),
            Access::Api if is_admin || is_api_client => Ok(who),
            Access::Gateway if is_admin || is_gateway => Ok(who),
            // A known token, on an endpoint it does not open.
            Access::Admin if is_api_client || is_gateway => {
                Err(AuthError::Forbidden("this endpoint needs the admin token"))
            }
            Access::Api if is_gateway => Err(AuthError::Forbidden(
                "this endpoint needs the API token or the admin token",
            )),
            Access::Gateway if is_api_client => Err(AuthError::Forbidden(
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
        Ok(client) => {
            let mut req = req;
            req.extensions_mut().insert(client);
            next.run(req).await
        }
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

    #[test]
    fn named_clients_open_the_api_as_themselves_with_keys_of_their_own() {
        const SHOP: &str = "shop-token-0123456789";
        let auth = HttpAuth::new(Some(&secret(API)), Some(&secret(ADMIN)))
            .unwrap()
            .with_clients(Some(&secret(&format!(
                "shop={SHOP}, partner=partner-token-0123456789"
            ))))
            .unwrap();
        let shop = auth.judge(Access::Api, Some(SHOP)).ok().unwrap();
        assert_eq!(shop.name(), "shop");
        assert_eq!(shop.scoped_key("k1"), "shop\u{1f}k1");
        let api = auth.judge(Access::Api, Some(API)).ok().unwrap();
        assert_eq!(api.scoped_key("k1"), "k1");
        assert!(matches!(
            auth.judge(Access::Admin, Some(SHOP)),
            Err(AuthError::Forbidden(_))
        ));
        assert!(matches!(
            auth.judge(Access::Gateway, Some(SHOP)),
            Err(AuthError::Forbidden(_))
        ));
        for bad in [
            "shop",
            "Shop=shop-token-0123456789",
            "admin=shop-token-0123456789",
            "shop=short",
            &format!("shop={API}"),
            "a=shop-token-0123456789,b=shop-token-0123456789",
        ] {
            assert!(
                HttpAuth::new(Some(&secret(API)), Some(&secret(ADMIN)))
                    .unwrap()
                    .with_clients(Some(&secret(bad)))
                    .is_err(),
                "{bad}"
            );
        }
    }
}
