//! Emit telemetry to a telemetry-bridge hub.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use worker::{Link, LinkOptions};
//! let link = Link::start(LinkOptions::new("http://127.0.0.1:50051", "gpu-3"))?;
//! let telemetry = link.emitter();
//! let mut span = telemetry.span("inference", &[("model", "llama-3-8b")], None);
//! // ... run the model ...
//! span.record("output_tokens", 212);
//! span.stop();
//! telemetry.emit("cache.hit", &[("bytes", 4096.into())], &[], None);
//! link.close(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`emitter`]: [`Emitter`]: `emit`, spans, toggle/filter/sampling, then encoding straight to
//!   bytes into the outage buffer (`buffer`: numbered, bounded, replayed until confirmed), with
//!   timestamps from `clock` (the TSC, anchored to the system clock).
//! - [`link`]: [`Link`]: the stream to the hub, reconnecting with backoff, replaying what the hub
//!   did not confirm, applying and acknowledging control, reporting counters.
//! - [`value`]: [`Value`], a measurement as `emit` takes it (`encode` writes it to the wire).
//! - [`counters`]: what became of every event.
//! - [`backoff`]: capped exponential backoff with jitter.
//! - [`config`]: the `[worker]` section of `config.toml`.
//! - [`sidecar`]: the `worker` binary: runs an app, relays its [`telemetry_line`]s, serves the
//!   [`local`] endpoint, reports [`gpu`] (NVML) and [`process`] metrics; its app is started
//!   by the [`launcher`], so that it dies with the sidecar.
//! - [`simulate`]: synthetic inference traffic for demos and tests.

pub mod backoff;
mod buffer;
mod clock;
pub mod config;
pub mod counters;
pub mod emitter;
mod encode;
mod fast_control;
pub mod gpu;
pub mod launcher;
pub mod link;
pub mod local;
pub mod process;
pub mod sidecar;
pub mod simulate;
pub mod telemetry_line;
pub mod value;

pub use crate::{
    emitter::{Emitter, Span},
    link::{Link, LinkError, LinkOptions, LinkState},
    value::Value,
};
