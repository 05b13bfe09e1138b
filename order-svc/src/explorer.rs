//! The Saga Explorer: a web page for watching sagas, served by order-svc.
//!
//! - `GET /explorer` (and `/explorer/app.js`, `/explorer/style.css`,
//!   `/explorer/favicon.svg`) — static HTML, JS and CSS embedded in the
//!   binary: no build step, nothing loaded from elsewhere (a strict
//!   Content-Security-Policy says so to the browser). Open: no token needed
//!   to load the page; the page asks for the API token when a data call
//!   answers 401 and keeps it in `sessionStorage`.
//! - `GET /sagas/stats?minutes=N` — headline numbers of the sagas started in
//!   the last N minutes (default 5, 1 to 60): started, confirmed, failed
//!   (by error), pending, p50/p99 of the decided ones' durations. API token.
//!
//! The page also reads `GET /sagas` (the list), `GET /sagas/{order_id}` (a
//! saga's timeline) and `GET /sagas/choreography` (who reacts to what);
//! see docs/explorer.md.

use std::sync::LazyLock;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use common::runtime::http::{ApiError, ApiQuery};
use common::runtime::openapi::ErrorBody;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::db;
use crate::http::HttpState;

/// The page's policy: its own scripts, styles and data only; no inline
/// script or style, no plugins, no framing, no form posting elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Served as is; revalidated on each load (the ETag is the content's
/// digest, so a new binary's page is picked up at once).
const CACHE_CONTROL: &str = "no-cache";

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: LazyLock<HeaderValue>,
}

macro_rules! asset {
    ($file:literal, $content_type:literal) => {
        Asset {
            body: include_str!(concat!("explorer/", $file)),
            content_type: $content_type,
            etag: LazyLock::new(|| etag_of(include_str!(concat!("explorer/", $file)))),
        }
    };
}

static INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
static APP_JS: Asset = asset!("app.js", "text/javascript; charset=utf-8");
static STYLE_CSS: Asset = asset!("style.css", "text/css; charset=utf-8");
static FAVICON: Asset = asset!("favicon.svg", "image/svg+xml");

fn etag_of(body: &str) -> HeaderValue {
    let digest = Sha256::digest(body.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&format!("\"{hex}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// The explorer's routes: the page and `/sagas/stats`.
pub fn api() -> OpenApiRouter<HttpState> {
    OpenApiRouter::new()
        .routes(routes!(page))
        .routes(routes!(page_slash))
        .routes(routes!(app_js))
        .routes(routes!(style_css))
        .routes(routes!(favicon))
        .routes(routes!(saga_stats))
}

/// `GET /explorer`: the page.
#[utoipa::path(get, path = "/explorer", tag = "explorer",
    responses(
        (status = 200, description = "The Saga Explorer", content_type = "text/html; charset=utf-8", body = String),
        (status = 304, description = "Not modified (If-None-Match matched the ETag)"),
    ))]
async fn page(h: HeaderMap) -> Response {
    serve(&INDEX, &h)
}

/// `GET /explorer/`: redirects to `/explorer`.
#[utoipa::path(get, path = "/explorer/", tag = "explorer",
    responses((status = 308, description = "To /explorer")))]
async fn page_slash() -> Redirect {
    Redirect::permanent("/explorer")
}

/// `GET /explorer/app.js`: the page's script.
#[utoipa::path(get, path = "/explorer/app.js", tag = "explorer",
    responses(
        (status = 200, description = "The script", content_type = "text/javascript; charset=utf-8", body = String),
        (status = 304, description = "Not modified"),
    ))]
async fn app_js(h: HeaderMap) -> Response {
    serve(&APP_JS, &h)
}

/// `GET /explorer/style.css`: the page's style.
#[utoipa::path(get, path = "/explorer/style.css", tag = "explorer",
    responses(
        (status = 200, description = "The style sheet", content_type = "text/css; charset=utf-8", body = String),
        (status = 304, description = "Not modified"),
    ))]
async fn style_css(h: HeaderMap) -> Response {
    serve(&STYLE_CSS, &h)
}

/// `GET /explorer/favicon.svg`: the page's icon.
#[utoipa::path(get, path = "/explorer/favicon.svg", tag = "explorer",
    responses(
        (status = 200, description = "The icon", content_type = "image/svg+xml", body = String),
        (status = 304, description = "Not modified"),
    ))]
async fn favicon(h: HeaderMap) -> Response {
    serve(&FAVICON, &h)
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = &*asset.etag;
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == etag)
        });
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        ),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        ),
        (header::ETAG, etag.clone()),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ];
    if fresh {
        (StatusCode::NOT_MODIFIED, headers).into_response()
    } else {
        (headers, asset.body).into_response()
    }
}

/// The widest window `/sagas/stats` looks back over: an hour (its
/// percentiles sort every saga of the window).
pub const MAX_STATS_MINUTES: i32 = 60;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    /// The window, in minutes back from now (default 5, at most 60).
    #[param(minimum = 1, maximum = 60)]
    minutes: Option<i64>,
}

/// `GET /sagas/stats?minutes=N`: the headline numbers.
#[utoipa::path(get, path = "/sagas/stats", tag = "sagas", params(StatsQuery),
    responses(
        (status = 200, description = "The sagas started in the window", body = db::SagaStats),
        (status = 400, description = "minutes out of range, or an unknown parameter", body = ErrorBody),
        (status = 503, description = "Too many expensive reads at once, or this one ran too long: retry", body = ErrorBody),
    ))]
async fn saga_stats(
    State(reads): State<crate::http::ExpensiveReads>,
    ApiQuery(q): ApiQuery<StatsQuery>,
) -> Result<Response, ApiError> {
    let minutes = q.minutes.unwrap_or(5);
    let minutes = i32::try_from(minutes)
        .ok()
        .filter(|m| (1..=MAX_STATS_MINUTES).contains(m))
        .ok_or_else(|| {
            ApiError::BadRequest(format!("minutes must be from 1 to {MAX_STATS_MINUTES}"))
        })?;
    let mut read = reads.begin().await?;
    let stats = db::saga_stats(&mut read.tx, minutes).await?;
    Ok(Json(stats).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_embedded_and_reference_only_themselves() {
        let html = INDEX.body;
        assert!(html.contains(r#"src="/explorer/app.js""#));
        assert!(html.contains(r#"href="/explorer/style.css""#));
        for asset in [&INDEX, &APP_JS, &STYLE_CSS, &FAVICON] {
            // The SVG namespace is a name, not something loaded.
            let body = asset.body.replace("http://www.w3.org/2000/svg", "");
            assert!(!body.contains("http://"), "no outside URL");
            assert!(!body.contains("https://"), "no outside URL");
            assert!(!body.contains("//cdn"), "no CDN");
        }
        assert!(!html.contains("<script>"), "no inline script (CSP)");
        assert!(!html.contains(" style="), "no inline style (CSP)");
        assert!(!APP_JS.body.contains("innerHTML"), "data goes in as text");
        assert!(!APP_JS.body.contains("eval("));
    }

    #[test]
    fn etags_differ_by_content_and_are_quoted() {
        let a = etag_of("a");
        assert_eq!(a, etag_of("a"));
        assert_ne!(a, etag_of("b"));
        let s = a.to_str().unwrap_or_default();
        assert!(s.starts_with('"') && s.ends_with('"') && s.len() == 26);
    }

    #[test]
    fn a_matching_if_none_match_answers_304() {
        let mut h = HeaderMap::new();
        assert_eq!(serve(&APP_JS, &h).status(), StatusCode::OK);
        h.insert(header::IF_NONE_MATCH, APP_JS.etag.clone());
        assert_eq!(serve(&APP_JS, &h).status(), StatusCode::NOT_MODIFIED);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        let r = serve(&APP_JS, &h);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            r.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
    }
}
