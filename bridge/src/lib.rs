//! The telemetry-bridge hub.
//!
//! Workers stream events in over `StreamTelemetry`; the hub passes them on to its outputs and
//! streams each worker its desired control state, which operators change at runtime.
//!
//! # How an event travels
//! ```text
//! worker stream ──▶ admission, enforcement ─┬─▶ Outputs::publish ──┬─▶ subscribers (gRPC, SSE)
//!  (worker_stream)   (limits, control state) │   (one hand-off)     ├─▶ OTLP export
//!                                            │                      └─▶ cluster publisher ─▶ NATS
//!                                            └─▶ the stream's share of the inference metrics
//! other hubs' batches ─▶ check each event ──────────────▲ (to the subscribers, by their filters)
//! ```
//! Every output owns its queue, its drops and its metrics, and never makes the door wait.
//!
//! # Layout
//! - [`config`]: `config.toml` and its validation.
//! - [`hub`]: the [`Hub`] handle that assembles the pieces below.
//! - [`registry`]: workers, their identity, sessions and counters.
//! - [`worker_stream`]: both halves of a worker's stream (events in, control out).
//! - [`outputs`]: the hand-off point and the outputs behind it; [`outputs::subscribers`]: live
//!   subscriptions, their filters, bounded queues and lag notices;
//!   [`outputs::inference_metrics`]: per-model metrics from this hub's workers' inference events.
//! - [`cluster`]: several hubs as one through NATS (an output, a source of events, and control
//!   state shared in JetStream); it sees the hub only through [`cluster::LocalHub`].
//! - [`command`]: an operator's command (which workers, what change) and its wire forms
//!   ([`event_rate`]: the goal of a target rate);
//!   [`control`]: desired control state per worker, versioned and persisted; [`reverts`]: the
//!   task that undoes timed changes when their time is up; [`steering`]: the task that keeps
//!   choosing the rate of levels under a target event rate.
//! - [`service`]: the gRPC edge; [`server`]: serving it with health and reflection, over TLS
//!   when configured; [`listener`]: accepting connections; [`connection_threads`]: threads
//!   that each own a share of them, when configured.
//! - [`auth`]: bearer tokens with roles, and client certificate names; [`tls`]: the
//!   certificate both ports serve.
//! - [`http`]: the HTTP port; [`metrics`]: the hub's state as Prometheus metrics;
//!   [`latency`]: the clock and the histograms the hot paths record for them.
//! - [`logging`]: log lines a peer's strings cannot forge or bloat.
//! - [`client`]: a typed client for the CLI and tests; [`render`]: deliveries, workers and
//!   control state as text and JSON, one shape for the CLI and the HTTP API.
//! - [`error`]: the hub's errors and their gRPC statuses.
//! - [`workspace`]: building the workspace's other binaries (the demo's `worker`) under cargo.

pub mod auth;
pub mod client;
pub mod cluster;
pub mod command;
pub mod config;
pub mod connection_threads;
pub mod control;
pub mod error;
pub mod event_rate;
pub mod http;
pub mod hub;
pub mod latency;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod outputs;
pub mod registry;
pub mod render;
pub mod reverts;
pub mod server;
pub mod service;
pub mod steering;
pub mod tls;
pub mod worker_stream;
pub mod workspace;

pub use crate::{config::Config, error::Error, hub::Hub, server::serve};
