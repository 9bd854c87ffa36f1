//! `telemetry_bridge._native`: the worker library ([`worker::Link`], [`worker::Emitter`]) as a
//! Python extension module. The package's Python layer (`telemetry_bridge/__init__.py`) adds
//! what is Python's own: spans as context managers nested through `contextvars`, decorators,
//! defaults from the environment, and the fork and exit hooks.
//!
//! There is one implementation of the worker protocol: control, acknowledgements, sampling,
//! sequence numbers, the outage buffer, receipts and reconnects are the worker library's, run by
//! a Tokio runtime of the client's own (one I/O thread). Python threads only encode and buffer.
//!
//! # Layout
//! - [`client`]: [`client::Client`], a link and its emitter; relinks in a forked child.
//! - [`span`]: [`span::NativeSpan`], a worker span shared with Python.
//! - [`convert`]: Python values to measurements and metadata, and the errors the API promises.
//! - `fork` (below): the fork generation every handle checks before use.

use pyo3::{prelude::*, sync::PyOnceLock, types::PyDict};

mod client;
mod convert;
mod span;

/// Counts forks: the Python layer calls [`after_fork_in_child`] from `os.register_at_fork`. A
/// handle made in an older generation belongs to the parent: its I/O thread did not survive the
/// fork and its locks may have been held when it happened, so the child never touches it.
pub(crate) mod fork {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    static GENERATION: AtomicU64 = AtomicU64::new(0);

    #[inline]
    pub(crate) fn generation() -> u64 {
        GENERATION.load(Relaxed)
    }

    pub(crate) fn forked() {
        GENERATION.fetch_add(1, Relaxed);
    }
}

/// Marks every handle made before now as the parent's, and reseeds this thread's random
/// generator: `rand`'s thread generator is copied by `fork` and not reseeded, so without this
/// the child would draw the parent's next trace ids, span ids and sampling draws (and every
/// child of one parent the same ones). Called in a forked child, before any Python code runs
/// there, on the one thread the child has.
#[pyfunction]
fn after_fork_in_child() {
    fork::forked();
    let _ = rand::rng().reseed();
}

/// `get` of the `contextvars.ContextVar` holding the current span (bound once), so that
/// `emit` inside a span joins its trace.
static CURRENT_SPAN_GET: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

pub(crate) fn current_span<'py>(py: Python<'py>) -> PyResult<Option<Bound<'py, span::NativeSpan>>> {
    let Some(get) = CURRENT_SPAN_GET.get(py) else {
        return Ok(None);
    };
    let current = get.bind(py).call0()?;
    Ok(current.cast_into::<span::NativeSpan>().ok())
}

/// Emits `name` within the current span if it is one of `conn`'s link and still open: the
/// event joins the span's trace and is sampled with it. False when the caller is to emit it
/// plainly; looking the span up is skipped when no span is open or nothing is let through.
#[inline]
pub(crate) fn emit_in_current_span(
    py: Python<'_>,
    conn: &client::Conn,
    name: &str,
    measurements: &[(&str, worker::Value<'_>)],
    metadata: &[(&str, &str)],
) -> PyResult<bool> {
    if !span::any_open() || !conn.emitter.enabled() {
        return Ok(false);
    }
    let Some(span) = current_span(py)? else {
        return Ok(false);
    };
    let span = span.get();
    Ok(span.belongs_to(conn) && span.event_in(name, measurements, metadata))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<client::Client>()?;
    m.add_class::<span::NativeSpan>()?;
    m.add_function(wrap_pyfunction!(after_fork_in_child, m)?)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("default", py.None())?;
    let var = py
        .import("contextvars")?
        .getattr("ContextVar")?
        .call(("telemetry_bridge.current_span",), Some(&kwargs))?;
    let _ = CURRENT_SPAN_GET.set(py, var.getattr("get")?.unbind());
    m.add("current_span", var)?;
    Ok(())
}
