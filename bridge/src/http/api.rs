//! `/api/workers` and `/api/.../control`: `ListWorkers`, `GetControl` and `UpdateControl` as
//! JSON over HTTP. Requests are converted to the RPCs' messages and validated by the same code,
//! so a bad rate or pattern gets the same message on either interface.

use std::{collections::HashMap, net::SocketAddr};

use axum::{
    Json,
    body::Bytes,
    extract::{ConnectInfo, FromRequestParts, Path, RawQuery, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, request::Parts},
};
use bridge_proto::{labels::LabelSet, v1};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, PeerAddr, authorize, query_params};
use crate::{
    auth::Access,
    command::{RESET_NOT_TIMED, Selector, parse_update},
    error::Error,
    hub::{Hub, Requester},
    render,
};

/// The selector a control route addresses: `{id}` a worker, `{name}` a pool, neither all (or,
/// with `?label=KEY=VALUE`, repeatable, the workers with all of those labels).
#[derive(Debug)]
pub struct Target(Selector);

/// The `label` query parameters as a label selector; `None` when there are none.
fn label_selector(query: Option<&str>) -> Result<Option<Selector>, ApiError> {
    let items: Vec<String> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(key, _)| key == "label")
        .map(|(_, value)| value.into_owned())
        .collect();
    if items.is_empty() {
        return Ok(None);
    }
    LabelSet::parse_items(items.iter().map(String::as_str))
        .map(|set| Some(Selector::Labels(set)))
        .map_err(|e| ApiError::invalid(format!("label: {e}")))
}

impl<S: Send + Sync> FromRequestParts<S> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|Path(params)| params)
            .unwrap_or_default();
        let labels = label_selector(parts.uri.query())?;
        let selector = match (params.get("id"), params.get("name"), labels) {
            (None, None, Some(labels)) => labels,
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "label: only /api/control takes labels; a worker's or a pool's route names its level",
                ));
            }
            (Some(id), _, None) => Selector::Worker(id.clone()),
            (None, Some(pool), None) => Selector::Pool(pool.clone()),
            (None, None, None) => Selector::All,
        };
        Ok(Self(selector))
    }
}

/// The client's address, when the server records it (not in in-process tests).
#[derive(Debug)]
pub struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<PeerAddr>>()
                .map(|info| info.0.0),
        ))
    }
}

/// `GET /api/workers[?pool=NAME | ?label=KEY=VALUE...]`
pub async fn list_workers(
    State(hub): State<Hub>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    authorize(&hub, &headers, None, Access::Read)?;
    let mut selector = label_selector(query.as_deref())?;
    for (key, value) in query_params(query.as_deref(), &["pool", "label"])? {
        if key == "pool" {
            if value.is_empty() {
                return Err(ApiError::invalid("pool: name a pool"));
            }
            if selector.is_some() {
                return Err(ApiError::invalid("pool: give a pool or labels, not both"));
            }
            selector = Some(Selector::Pool(value));
        }
    }
    let listed = hub.list_workers(selector.as_ref()).await;
    let workers: Vec<Value> = listed.workers.iter().map(render::worker_json).collect();
    Ok(Json(
        json!({ "workers": workers, "unanswered_hubs": listed.unanswered_hubs }),
    ))
}

/// `GET /api/workers/{id}`
pub async fn get_worker(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&hub, &headers, None, Access::Read)?;
    let workers = hub.list_workers(Some(&Selector::Worker(id.clone()))).await;
    let worker = workers.workers.first().ok_or(Error::UnknownWorker(id))?;
    Ok(Json(render::worker_json(worker)))
}

/// `GET .../control`: the effective state and the layers it comes from.
pub async fn show_control(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Target(selector): Target,
) -> Result<Json<Value>, ApiError> {
    authorize(&hub, &headers, None, Access::Read)?;
    let description = hub.describe_control(&selector).await?;
    Ok(Json(render::describe_control_json(&description)))
}

/// A control change as JSON: exactly one of a sampling rate (optionally for some patterns), a
/// toggle, or a filter; the field names are those of the `UpdateControlRequest` messages.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeBody {
    sampling_rate: Option<f64>,
    event_patterns: Option<Vec<String>>,
    enabled: Option<bool>,
    allowed_events: Option<Vec<String>>,
    blocked_events: Option<Vec<String>>,
    target_events_per_second: Option<f64>,
    wait_ms: Option<u32>,
    /// Any JSON value, so that a wrong one gets this API's message rather than serde's.
    for_ms: Option<Value>,
}

const CHANGE_KINDS: &str = "set one of sampling_rate (with event_patterns to limit it), enabled, \
                            allowed_events/blocked_events, or target_events_per_second";

/// `for_ms` of a change body or a reset's query: a whole number of milliseconds, more than 0.
/// (The upper bound is checked with the change, as for gRPC.)
fn parse_for_ms(value: &Value) -> Result<u64, ApiError> {
    match value.as_u64() {
        Some(ms) if ms > 0 => Ok(ms),
        _ => Err(ApiError::invalid(format!(
            "for_ms: `{value}` is not a number of milliseconds above 0 (a timed change lasts up to 30 days)"
        ))),
    }
}

impl ChangeBody {
    fn into_change(self) -> Result<(v1::update_control_request::Change, u32, u64), ApiError> {
        use v1::update_control_request::Change;
        let sampling = self.sampling_rate.is_some() || self.event_patterns.is_some();
        let filter = self.allowed_events.is_some() || self.blocked_events.is_some();
        let target = self.target_events_per_second;
        let kinds = [sampling, self.enabled.is_some(), filter, target.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(ApiError::invalid(format!("body: {CHANGE_KINDS}")));
        }
        let change = if sampling {
            let rate = self.sampling_rate.ok_or_else(|| {
                ApiError::invalid("body: event_patterns needs a sampling_rate for them")
            })?;
            Change::Sampling(v1::TelemetrySamplingUpdate {
                sampling_rate: rate,
                event_patterns: self.event_patterns.unwrap_or_default(),
            })
        } else if let Some(events_per_second) = target {
            Change::Target(v1::TargetRate { events_per_second })
        } else if let Some(enabled) = self.enabled {
            Change::Toggle(v1::TelemetryToggle { enabled })
        } else {
            Change::Filter(v1::TelemetryEventFilter {
                allowed_events: self.allowed_events.unwrap_or_default(),
                blocked_events: self.blocked_events.unwrap_or_default(),
            })
        };
        let for_ms = self.for_ms.as_ref().map(parse_for_ms).transpose()?;
        Ok((change, self.wait_ms.unwrap_or(0), for_ms.unwrap_or(0)))
    }
}

/// `PUT .../control`
pub async fn change_control(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Peer(peer): Peer,
    Target(selector): Target,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let token = authorize(&hub, &headers, None, Access::Admin)?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body: larger than {} bytes", super::MAX_BODY_BYTES),
        ),
        _ => ApiError::invalid(format!("body: {rejection}")),
    })?;
    let body: ChangeBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(format!(
            "body: {e} (expected a JSON object such as {{\"sampling_rate\": 0.1}})"
        ))
    })?;
    let (change, wait_ms, for_ms) = body.into_change()?;
    update(&hub, token, peer, selector, change, wait_ms, for_ms).await
}

/// `DELETE .../control[?wait_ms=N]`: forget this level's own settings.
pub async fn reset_control(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Peer(peer): Peer,
    Target(selector): Target,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let token = authorize(&hub, &headers, None, Access::Admin)?;
    let mut wait_ms = 0;
    for (key, value) in query_params(query.as_deref(), &["wait_ms", "for_ms", "label"])? {
        match key.as_ref() {
            "for_ms" => return Err(ApiError::invalid(format!("for_ms: {RESET_NOT_TIMED}"))),
            // The selector's, read by `Target`.
            "label" => continue,
            _ => {}
        }
        wait_ms = value.parse().map_err(|_| {
            ApiError::invalid(format!(
                "wait_ms: `{value}` is not a number of milliseconds"
            ))
        })?;
    }
    let reset = v1::update_control_request::Change::Reset(v1::ResetControl {});
    update(&hub, token, peer, selector, reset, wait_ms, 0).await
}

async fn update(
    hub: &Hub,
    token: Option<String>,
    peer: Option<SocketAddr>,
    selector: Selector,
    change: v1::update_control_request::Change,
    wait_ms: u32,
    for_ms: u64,
) -> Result<Json<Value>, ApiError> {
    let request = v1::UpdateControlRequest {
        selector: Some(v1::Selector::from(&selector)),
        change: Some(change),
        wait_ms,
        for_ms,
    };
    let update = parse_update(request)?;
    let requester = Requester {
        token: token.as_deref(),
        via: "http",
        peer,
    };
    let response = hub.update_control(&update, requester).await?;
    Ok(Json(render::update_json(&response)))
}
