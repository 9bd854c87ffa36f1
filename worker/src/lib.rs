//! Emit telemetry to a telemetry-bridge hub.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use worker::{Link, LinkOptions};
//! let link = Link::start(LinkOptions::new("http://127.0.0.1:50051", "gpu-3"))?;
//! let telemetry = link.emitter();
//! let span = telemetry.span("inference", &[("model", "llama-3-8b")], None);
//! // ... run the model ...
//! span.stop();
//! telemetry.emit("cache.hit", &[("bytes", 4096.into())], &[], None);
//! link.close(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`emitter`]: [`Emitter`]: `emit`, spans, toggle/filter/sampling before the bounded queue.
//! - [`link`]: [`Link`]: the stream to the hub, reconnecting with backoff, applying and
//!   acknowledging control, reporting counters.
//! - [`counters`]: what became of every event.
//! - [`backoff`]: capped exponential backoff with jitter.
//! - [`config`]: the `[worker]` section of `config.toml`.
//! - [`simulate`]: synthetic inference traffic for demos and tests.

pub mod backoff;
pub mod config;
pub mod counters;
pub mod emitter;
pub mod link;
pub mod simulate;

pub use crate::{
    emitter::{Emitter, Span, Value},
    link::{Link, LinkError, LinkOptions, LinkState},
};
