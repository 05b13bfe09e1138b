//! The OpenAPI 3.1 document of a service's HTTP API.
//!
//! Generated from the handlers themselves (`#[utoipa::path]` on each one,
//! collected by the `OpenApiRouter` that also routes them), so an endpoint
//! cannot be served without being documented. What the shared middleware
//! adds to every endpoint — the bearer-token security of [`auth`], the 401,
//! 403, 408, 413, 415, 500 and 503 answers — is added here, once, from the
//! same rules the middleware applies. Each service serves its document at
//! `GET /openapi.json`; the copies committed under `docs/openapi/` are
//! checked against the code by a test (`tests/tests/contracts`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, OpenApi, RefOr, ResponseBuilder};
use utoipa::{PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::runtime::auth::{self, Access};
use crate::runtime::http::{self, OpsState};

/// Every error answer: `{"error": "..."}` (the message says why).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
        }
    }
}

/// The security scheme of the API token (`API_TOKEN`; the admin token is
/// accepted too).
pub const API_TOKEN: &str = "api_token";
/// The security scheme of the admin token (`ADMIN_TOKEN`).
pub const ADMIN_TOKEN: &str = "admin_token";
/// The security scheme of the card gateway's token (`GATEWAY_TOKEN`).
pub const GATEWAY_TOKEN: &str = "gateway_token";

/// The media type of a JSON body.
const JSON: &str = "application/json";

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This service's OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
async fn openapi_json(State(doc): State<Arc<String>>) -> impl IntoResponse {
    // Serialized once at start-up. (The copy per answer is some 70 KB: the
    // `routes!` macro wants a state type with a schema, which `Bytes` has
    // not.)
    ([(header::CONTENT_TYPE, JSON)], doc.as_str().to_owned())
}

/// The whole document of a service whose own endpoints are `own`: they,
/// the operational endpoints every service has ([`http::ops_api`]) and
/// `/openapi.json`, with the shared middleware's security and answers.
pub fn service_document(service: &str, own: OpenApi) -> OpenApi {
    let mut doc = own;
    doc.merge(http::ops_api().into_openapi());
    doc.merge(document_route().into_openapi());
    finish(service, doc)
}

fn document_route() -> OpenApiRouter<Arc<String>> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// The routes every service serves besides its own: the operational ones
/// and `GET /openapi.json` answering `doc`.
pub fn shared_routes(ops: OpsState, doc: &OpenApi) -> Result<axum::Router, serde_json::Error> {
    let json = Arc::new(to_committed_json(doc)?);
    let (documents, _) = document_route().with_state(json).split_for_parts();
    let (ops, _) = http::ops_api().with_state(ops).split_for_parts();
    Ok(ops.merge(documents))
}

/// The document as served, and as committed under `docs/openapi/`: pretty
/// JSON, one trailing newline.
pub fn to_committed_json(doc: &OpenApi) -> Result<String, serde_json::Error> {
    let mut json = doc.to_pretty_json()?;
    json.push('\n');
    Ok(json)
}

fn finish(service: &str, mut doc: OpenApi) -> OpenApi {
    doc.info.title = service.to_owned();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.info.description = Some(format!(
        "The HTTP API of {service}, one of the four services of the order saga. \
         Generated from the code; served at GET /openapi.json. Bearer tokens: the API \
         token places and reads orders and sagas, the admin token may call everything. \
         With no tokens configured (development) every endpoint is open."
    ));
    doc.info.license = None;
    doc.info.contact = None;
    let components = doc.components.take().unwrap_or_default();
    let mut components = ComponentsBuilder::from(components)
        .schema(ErrorBody::name(), ErrorBody::schema())
        .build();
    components.add_security_scheme(
        API_TOKEN,
        bearer("The API token (API_TOKEN); the admin token is accepted as well."),
    );
    components.add_security_scheme(ADMIN_TOKEN, bearer("The admin token (ADMIN_TOKEN)."));
    if doc
        .paths
        .paths
        .keys()
        .any(|path| auth::required_access(path) == Access::Gateway)
    {
        components.add_security_scheme(
            GATEWAY_TOKEN,
            bearer("The card gateway's token (GATEWAY_TOKEN): its 3-D Secure answers only."),
        );
    }
    doc.components = Some(components);

    for (path, item) in doc.paths.paths.iter_mut() {
        let access = auth::required_access(path);
        for (operation, takes_body) in [
            (item.get.as_mut(), false),
            (item.delete.as_mut(), false),
            (item.put.as_mut(), true),
            (item.post.as_mut(), true),
            (item.patch.as_mut(), true),
        ] {
            if let Some(operation) = operation {
                shared_answers(operation, access, takes_body);
            }
        }
    }
    doc
}

fn bearer(description: &str) -> SecurityScheme {
    SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(description))
            .build(),
    )
}

/// What the middleware adds to an operation: its security, and the answers
/// it gives before (or instead of) the handler. A method that may carry a
/// body is refused one that is too large or not JSON, even where the
/// handler reads none.
fn shared_answers(operation: &mut Operation, access: Access, takes_body: bool) {
    let no_scopes: [&str; 0] = [];
    match access {
        Access::Open => {}
        Access::Api => {
            operation.security = Some(vec![
                SecurityRequirement::new(API_TOKEN, no_scopes),
                SecurityRequirement::new(ADMIN_TOKEN, no_scopes),
            ]);
            error_answer(operation, 401, "No bearer token, or not a valid one");
        }
        Access::Gateway => {
            operation.security = Some(vec![
                SecurityRequirement::new(GATEWAY_TOKEN, no_scopes),
                SecurityRequirement::new(ADMIN_TOKEN, no_scopes),
            ]);
            error_answer(operation, 401, "No bearer token, or not a valid one");
            error_answer(
                operation,
                403,
                "A token that does not open this endpoint (the API token)",
            );
        }
        Access::Admin => {
            operation.security = Some(vec![SecurityRequirement::new(ADMIN_TOKEN, no_scopes)]);
            error_answer(operation, 401, "No bearer token, or not a valid one");
            error_answer(
                operation,
                403,
                "The API token on an endpoint that needs the admin token",
            );
        }
    }
    if takes_body {
        let responses = &mut operation.responses.responses;
        responses.entry("413".to_owned()).or_insert_with(|| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(format!(
                        "The body is larger than {} bytes",
                        http::MAX_REQUEST_BODY_BYTES
                    ))
                    .build(),
            )
        });
        error_answer(
            operation,
            415,
            "The body is not declared as application/json",
        );
    }
    operation
        .responses
        .responses
        .entry("408".to_owned())
        .or_insert_with(|| {
            RefOr::T(
                ResponseBuilder::new()
                    .description("The request took longer than HTTP_REQUEST_TIMEOUT_MS")
                    .build(),
            )
        });
    error_answer(operation, 500, "Unexpected; the cause is logged");
    error_answer(
        operation,
        503,
        "A dependency (the database or the broker) is unavailable, or too many requests are in \
         flight: retry later",
    );
}

/// Adds a `{"error": ...}` answer with `status`, unless the handler
/// documents its own.
fn error_answer(operation: &mut Operation, status: u16, description: &str) {
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| error_response(description));
}

/// A `{"error": ...}` answer.
fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                JSON,
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        ErrorBody::name(),
                    ))))
                    .build(),
            )
            .build(),
    )
}
