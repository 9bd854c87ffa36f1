//! `GET /api/events`: the live tail as server-sent events, for `curl -N` and a browser's
//! `EventSource`. Each message's data is one JSON object in the shape of
//! `bridge subscribe --format json` (`"type": "event"` or `"type": "lag"`); when the hub shuts
//! down the stream sends an `end` event and closes.

use std::convert::Infallible;

use axum::{
    extract::{RawQuery, State},
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use bridge_proto::{
    condition::Condition,
    labels::LabelSet,
    trace::TraceId,
    v1::{self, subscribe_response::Item},
};
use prost::Message;
use serde_json::json;
use tokio_stream::{Stream, StreamExt};

use super::{ApiError, authorize, query_params};
use crate::{auth::Access, hub::Hub, outputs::subscribers::FeedItem, render};

/// `?pattern=P&worker=ID&pool=NAME&trace=ID&where=KEY=VALUE&label=KEY=VALUE&linger_ms=N` (patterns,
/// workers, `where` and `label` repeatable; `trace` a trace id in hex; `where` also
/// `KEY!=VALUE`, percent-encoded as any value), and `token` for clients that cannot set an `authorization` header
/// (`EventSource` cannot).
pub async fn live_events(
    State(hub): State<Hub>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let mut request = v1::SubscribeRequest::default();
    let mut token = None;
    let known = [
        "pattern",
        "worker",
        "pool",
        "trace",
        "where",
        "label",
        "linger_ms",
        "token",
    ];
    let mut labels = Vec::new();
    for (key, value) in query_params(query.as_deref(), &known)? {
        match key.as_str() {
            "pattern" => request.patterns.push(value),
            "worker" => request.worker_ids.push(value),
            "pool" => request.pool = value,
            "trace" => {
                let id = TraceId::parse_any_case(value.trim())
                    .map_err(|e| ApiError::invalid(format!("trace: {e}")))?;
                request.trace_id = id.as_bytes().to_vec();
            }
            "where" => {
                let condition = Condition::parse(&value)
                    .map_err(|e| ApiError::invalid(format!("where: {e}")))?;
                request.metadata_conditions.push((&condition).into());
            }
            "label" => labels.push(value),
            "linger_ms" => {
                request.linger_ms = value.trim().parse().map_err(|_| {
                    ApiError::invalid(format!(
                        "linger_ms: not a number of milliseconds: {value:?}"
                    ))
                })?;
            }
            "token" => token = Some(value),
            _ => {}
        }
    }
    if !labels.is_empty() {
        let set = LabelSet::parse_items(labels.iter().map(String::as_str))
            .map_err(|e| ApiError::invalid(format!("label: {e}")))?;
        request.worker_labels = set.labels().clone().into_iter().collect();
    }
    authorize(&hub, &headers, token.as_deref(), Access::Read)?;
    let tail = hub.subscribe(request)?;
    let events = tail.filter_map(|item| {
        let data = match item {
            FeedItem::Event(response) => {
                match v1::SubscribeResponse::decode(response.as_bytes().clone()) {
                    Ok(v1::SubscribeResponse {
                        item: Some(Item::Event(delivery)),
                    }) => render::delivery_json(&delivery),
                    // The hub encoded it itself; this cannot fail short of a bug, and one
                    // event is not worth ending the stream for.
                    _ => return None,
                }
            }
            FeedItem::Lagged(skipped) => render::lag_json(skipped),
            FeedItem::ShuttingDown => {
                return Some(Ok(Event::default().event("end").data(
                    json!({ "type": "end", "reason": "the hub is shutting down" }).to_string(),
                )));
            }
        };
        Some(Ok(Event::default().data(data.to_string())))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
