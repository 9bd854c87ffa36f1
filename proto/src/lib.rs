//! The telemetry-bridge gRPC contract, `telemetry.bridge.v1`.
//!
//! # Layout
//! - [`v1`]: every message and the `TelemetryBridge` client, generated from
//!   `telemetry/bridge/v1/bridge.proto` (the comments there are the API documentation).
//! - [`server`]: the service trait the hub implements; it streams subscribers
//!   [`encoded::EncodedSubscribeResponse`]s instead of `v1::SubscribeResponse`s.
//! - [`worker_client`]: the client as workers use it, streaming [`encoded::EncodedEvent`]s.
//! - [`codec`]: the server's codec, with small per-stream buffers.
//! - [`encoded`]: messages encoded once: subscription items shared by every subscriber, and
//!   events a worker buffers until the hub confirms them.
//! - [`identity`]: the rule for worker ids, pool names and labels, which every participant
//!   checks where they enter; [`labels`]: sets of labels that select workers.
//! - [`limits`]: the hub's limits on one event, which workers apply before buffering.
//! - [`pattern`]: event names and NATS-style patterns (`*`, `>`); [`condition`]: conditions
//!   on an event's metadata (`model=llama`, `result!=success`), for subscriptions.
//! - [`protocol`]: the names and defaults beside the messages: request metadata, reserved
//!   event names, worker counters and hub drop reasons, GPU events, the span and inference
//!   conventions (catalogued in `docs/conventions.md`), the outage buffer size.
//! - [`sampling`]: the sampling rate and the deterministic decision per trace or correlation
//!   id.
//! - [`trace`]: W3C trace context: trace and span ids, `traceparent`.
//! - [`control`]: a worker's effective control state and the verdict it gives each event.
//! - [`view`]: `TelemetryEvent` as the hub receives it, without building its maps, and a
//!   delivery another hub passed on, checked where it lies.
//! - [`batch`]: the batches of deliveries hubs pass one another in cluster mode.
//! - [`fields`]: field numbers for the codecs written by hand ([`encoded`], [`view`], the
//!   worker's encoder), checked against the contract.
//! - [`connect`]: what every client of the hub needs to connect: token and TLS options, a
//!   failure as one line, the default name of a participant.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.
//!
//! The semantics every participant must share (names, patterns, sampling, control) live here,
//! beside the wire types, so that the hub and the workers cannot drift apart.

pub mod batch;
pub mod codec;
pub mod condition;
pub mod connect;
pub mod control;
pub mod encoded;
pub mod fields;
pub mod identity;
pub mod labels;
pub mod limits;
pub mod pattern;
pub mod protocol;
pub mod sampling;
pub mod trace;
pub mod view;

/// Messages and the client of `telemetry.bridge.v1`.
#[allow(missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/full/telemetry.bridge.v1.rs"));
}

/// The `TelemetryBridge` service trait, as the hub implements it.
#[allow(missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod server {
    include!(concat!(env!("OUT_DIR"), "/server/telemetry.bridge.v1.rs"));
}

/// The `TelemetryBridge` client as workers use it: `StreamTelemetry` sends
/// [`encoded::EncodedEvent`]s, so that buffered events are encoded once and replayed as they are.
#[allow(missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod worker_client {
    include!(concat!(
        env!("OUT_DIR"),
        "/worker_client/telemetry.bridge.v1.rs"
    ));
}

/// Encoded `FileDescriptorSet` of the contract, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bridge_descriptor.bin"));

/// The fully qualified service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "telemetry.bridge.v1.TelemetryBridge";
