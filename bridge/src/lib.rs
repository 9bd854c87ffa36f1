//! The telemetry-bridge hub.
//!
//! Workers stream events in over `StreamTelemetry`; the hub fans them out to subscribers and
//! streams each worker its desired control state, which operators change at runtime.
//!
//! # Layout
//! - [`config`]: `config.toml` and its validation.
//! - [`hub`]: the [`Hub`] handle tying the pieces below together.
//! - [`registry`]: workers, their identity, sessions and counters.
//! - [`worker_stream`]: both halves of a worker's stream (events in, control out).
//! - [`fanout`]: subscribers, their filters, bounded queues and lag notices.
//! - [`control`]: desired control state per worker, versioned and persisted.
//! - [`service`]: the gRPC edge; [`server`]: serving it with health and reflection, over TLS
//!   when configured; [`listener`]: accepting connections.
//! - [`auth`]: bearer tokens with roles, and client certificate names.
//! - [`http`]: the HTTP port; [`metrics`]: the hub's state as Prometheus metrics;
//!   [`latency`]: the histograms the hot paths record for them.
//! - [`client`]: a typed client for the CLI and tests; [`render`]: deliveries, workers and
//!   control state as text and JSON, one shape for the CLI and the HTTP API.
//! - [`error`]: the hub's errors and their gRPC statuses.

pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod error;
pub mod fanout;
pub mod http;
pub mod hub;
pub mod latency;
pub mod listener;
pub mod metrics;
pub mod registry;
pub mod render;
pub mod server;
pub mod service;
pub mod worker_stream;

pub use crate::{config::Config, error::Error, hub::Hub, server::serve};
