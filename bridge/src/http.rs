//! The hub's HTTP port: `/metrics` (Prometheus / OpenMetrics text), `/healthz` (the process
//! serves) and `/readyz` (it accepts workers and subscribers: 503 once shutting down).

use std::future::Future;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::{auth::Access, hub::Hub, metrics};

/// Serves the HTTP routes on `listener` until `shutdown` completes.
pub async fn serve(
    hub: Hub,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let routes = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(hub);
    axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Metrics name every worker: with tokens configured they need a reader or admin token, as
/// `ListWorkers` does (Prometheus sends one with `authorization: {credentials: ...}`).
async fn scrape(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    // Prometheus asks for OpenMetrics; anything else gets the classic text format.
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let metadata = tonic::metadata::MetadataMap::from_headers(headers);
    if let Err(status) = hub.auth().check(&metadata, Access::Read) {
        let code = match status.code() {
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        return (code, format!("{}\n", status.message())).into_response();
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

async fn ready(State(hub): State<Hub>) -> impl IntoResponse {
    if hub.shutdown_token().is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
