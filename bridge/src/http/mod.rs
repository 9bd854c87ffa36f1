//! The hub's HTTP port: `/metrics` (Prometheus / OpenMetrics text), `/healthz` (the process
//! serves), `/readyz` (it accepts workers and subscribers: 503 once shutting down), and the JSON
//! API under `/api` (`api`, `events`), described by `/api/openapi.json`.
//!
//! The API is the admin RPCs over HTTP: same validation, same messages, same tokens and roles,
//! with gRPC status codes mapped to HTTP ones ([`ApiError`]).

mod api;
mod events;
mod hosts;
mod server;

use std::future::Future;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get},
};
use serde_json::json;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{auth::Access, config::HubConfig, hub::Hub, metrics};

/// The API description, written by hand and checked against the routes and the JSON they
/// return by tests (`every_route_is_described_and_every_description_routed` below, and the
/// HTTP API integration tests).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest request body accepted (a control change is a few hundred bytes).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Every route, by path; the router is built from this list so that a test can compare it with
/// the OpenAPI document.
fn routes() -> Vec<(&'static str, MethodRouter<Hub>)> {
    vec![
        ("/metrics", get(scrape)),
        ("/healthz", get(|| async { "ok\n" })),
        ("/readyz", get(ready)),
        (
            "/api/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        ),
        ("/api/workers", get(api::list_workers)),
        ("/api/workers/{id}", get(api::get_worker)),
        (
            "/api/workers/{id}/control",
            get(api::show_control)
                .put(api::change_control)
                .delete(api::reset_control),
        ),
        (
            "/api/pools/{name}/control",
            get(api::show_control)
                .put(api::change_control)
                .delete(api::reset_control),
        ),
        (
            "/api/control",
            get(api::show_control)
                .put(api::change_control)
                .delete(api::reset_control),
        ),
        ("/api/events", get(events::live_events)),
    ]
}

/// The HTTP routes of `hub`, with CORS for the configured origins.
pub fn router(hub: Hub) -> Router {
    let cors = cors(&hub.config().hub);
    let router = routes()
        .into_iter()
        .fold(Router::new(), |router, (path, route)| {
            router.route(path, route)
        })
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route (see /api/openapi.json)",
            )
        })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("this route does not take {method} (see /api/openapi.json; `allow` lists what it takes)"),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(hub.clone());
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    hosts::guard(router, &hub)
}

/// Serves the HTTP routes on `listener` until `shutdown` completes: TLS when `[tls]` is set,
/// with the gRPC port's connection limits (`limits.max_connections` of its own, and the
/// handshake timeout) and timeouts on request heads and idle connections (see [`server`]).
pub async fn serve(
    hub: Hub,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(hub.clone(), router(hub), listener, shutdown).await
}

/// The client's address, recorded for every request (see [`api::Peer`]).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

fn cors(config: &HubConfig) -> Option<CorsLayer> {
    let origins = &config.http_allowed_origins;
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Validated with the configuration, so every origin is a valid header value.
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::PUT, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    )
}

/// An error as the API returns it: the HTTP status for the gRPC code, and
/// `{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "..."}}` (the JSON form
/// of `google.rpc.Status`), the message being the one gRPC clients get.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    grpc: tonic::Code,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let grpc = match status {
            StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
            // gRPC's code for a message over the size limit.
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::URI_TOO_LONG => {
                tonic::Code::ResourceExhausted
            }
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
            // What gRPC answers for a method a service does not have.
            StatusCode::METHOD_NOT_ALLOWED => tonic::Code::Unimplemented,
            _ => tonic::Code::Unknown,
        };
        Self {
            status,
            grpc,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status: http,
            grpc: status.code(),
            message: status.message().to_owned(),
        }
    }
}

impl From<crate::Error> for ApiError {
    fn from(error: crate::Error) -> Self {
        tonic::Status::from(error).into()
    }
}

impl ApiError {
    /// The error as JSON, in the documented shape.
    fn json(&self) -> serde_json::Value {
        let status_name = format!("{:?}", self.grpc);
        json!({
            "error": {
                "code": self.status.as_u16(),
                "status": screaming_snake(&status_name),
                "message": self.message,
            }
        })
    }

    /// [`ApiError::json`] as text, for answers written before the router is reached.
    fn body(&self) -> String {
        self.json().to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.json())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `InvalidArgument` → `INVALID_ARGUMENT`, the spelling of gRPC status names.
fn screaming_snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The query string's parameters in order; a key not in `known` is an error, so that a typo
/// (`?patern=`) is reported rather than silently widening a filter.
fn query_params(query: Option<&str>, known: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(key, value)| {
            if known.contains(&key.as_ref()) {
                Ok((key.into_owned(), value.into_owned()))
            } else {
                Err(ApiError::invalid(format!(
                    "unknown query parameter `{key}` (this route takes: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )))
            }
        })
        .collect()
}

/// Checks the request's bearer token (header, or `token` when a client cannot set headers)
/// for `access`; returns the token holder's name when the hub has tokens.
fn authorize(
    hub: &Hub,
    headers: &HeaderMap,
    token: Option<&str>,
    access: Access,
) -> Result<Option<String>, ApiError> {
    let mut metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
    if let Some(token) = token
        && !headers.contains_key(header::AUTHORIZATION)
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        metadata.insert("authorization", value);
    }
    Ok(hub.auth().check(&metadata, access)?.map(str::to_owned))
}

/// Metrics name every worker: with tokens configured they need a reader or admin token, as
/// `ListWorkers` does (Prometheus sends one with `authorization: {credentials: ...}`).
async fn scrape(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    // Prometheus asks for OpenMetrics; anything else gets the classic text format.
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if let Err(error) = authorize(&hub, &headers, None, Access::Read) {
        return (error.status, format!("{}\n", error.message)).into_response();
    }
    match metrics::render(&hub) {
        Ok(text) if openmetrics => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            text,
        ),
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, metrics::PROMETHEUS_CONTENT_TYPE)],
            metrics::to_prometheus_text(&text),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "cannot render metrics\n".to_owned(),
        ),
    }
    .into_response()
}

/// Ready while not shutting down. A clustered hub whose NATS connection is down still serves
/// its own workers and subscribers, so it stays ready and says it is degraded.
async fn ready(State(hub): State<Hub>) -> impl IntoResponse {
    if hub.shutdown_token().is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if hub.cluster().is_some_and(|c| !c.connected()) {
        (
            StatusCode::OK,
            "ready, degraded: no NATS connection; serving local workers and subscribers only\n",
        )
    } else if hub.cluster().is_some_and(|c| !c.following()) {
        (
            StatusCode::OK,
            "ready, degraded: not following the cluster's control state yet (NATS JetStream); control changes are refused\n",
        )
    } else if hub.otlp().is_some_and(|otlp| !otlp.reachable()) {
        (
            StatusCode::OK,
            "ready, degraded: the OTLP collector is unreachable; records queue, and drop when the queue is full\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    fn hub(state: &tempfile::TempDir) -> Hub {
        let mut config = crate::Config::default();
        config.hub.state_dir = state.path().to_owned();
        Hub::new(config).unwrap()
    }

    /// Documented operations by path, with `{param}` as axum writes it.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .map(|(path, item)| {
                let methods = item
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(|m| m.to_uppercase())
                    .collect();
                (path.clone(), methods)
            })
            .collect()
    }

    #[tokio::test]
    async fn every_route_is_described_and_every_description_routed() {
        let state = tempfile::tempdir().unwrap();
        let hub = hub(&state);
        let documented = documented();
        let routed: BTreeSet<String> = routes().into_iter().map(|(p, _)| p.to_owned()).collect();
        assert_eq!(
            routed,
            documented.keys().cloned().collect::<BTreeSet<_>>(),
            "routes and openapi.json paths differ"
        );
        for (path, methods) in &documented {
            let concrete = path.replace("{id}", "nobody").replace("{name}", "nopool");
            for method in ["GET", "PUT", "DELETE", "POST", "PATCH"] {
                let request = axum::http::Request::builder()
                    .method(method)
                    .uri(&concrete)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from("{}"))
                    .unwrap();
                let response = router(hub.clone()).oneshot(request).await.unwrap();
                let routed = response.status() != StatusCode::METHOD_NOT_ALLOWED;
                assert_eq!(
                    routed,
                    methods.contains(method),
                    "{method} {path}: routed={routed}, documented={}",
                    methods.contains(method)
                );
            }
        }
    }

    #[test]
    fn grpc_code_names_are_spelled_as_grpc_spells_them() {
        assert_eq!(screaming_snake("InvalidArgument"), "INVALID_ARGUMENT");
        assert_eq!(screaming_snake("NotFound"), "NOT_FOUND");
        assert_eq!(screaming_snake("Unknown"), "UNKNOWN");
    }
}
