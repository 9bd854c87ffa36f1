//! [`NativeSpan`]: a worker [`Span`] behind a Python object (`telemetry_bridge.Span` derives
//! from it and adds the context manager).
//!
//! A span's trace ids are copied out when it starts, so that reading them, and starting a child
//! (`span_from` with this span's `traceparent` and correlation id, which is exactly what
//! `Span::child` does), never locks. The worker span itself sits in a `Mutex<Option<_>>`: taken
//! when it ends, so ending twice is harmless.

use std::sync::{
    Mutex,
    atomic::{AtomicUsize, Ordering::Relaxed},
};

use pyo3::{exceptions::PyRuntimeError, prelude::*, types::PyDict};
use worker::{Span, Value};

use crate::{
    client::{Client, Conn},
    convert, fork,
};

/// Spans started and not yet ended, in this process: while there are none, `emit` does not
/// look up the current span (a `ContextVar.get`, a good part of its cost).
static OPEN: AtomicUsize = AtomicUsize::new(0);

#[inline]
pub(crate) fn any_open() -> bool {
    OPEN.load(Relaxed) > 0
}

#[pyclass(subclass, frozen, module = "telemetry_bridge._native", name = "Span")]
#[derive(Debug)]
pub struct NativeSpan {
    generation: u64,
    conn: usize,
    inner: Mutex<Option<Span>>,
    operation: String,
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    traceparent: String,
    correlation_id: String,
}

impl NativeSpan {
    pub(crate) fn belongs_to(&self, conn: &Conn) -> bool {
        self.conn == conn.id() && self.generation == fork::generation()
    }

    /// Emits `name` within this span; false if the span has ended (the caller emits it plainly).
    pub(crate) fn event_in(
        &self,
        name: &str,
        measurements: &[(&str, Value<'_>)],
        metadata: &[(&str, &str)],
    ) -> bool {
        match self.inner.lock().as_deref() {
            Ok(Some(span)) => {
                span.event(name, measurements, metadata);
                true
            }
            _ => false,
        }
    }

    /// Takes the worker span to end it; `None` if it has ended, or belongs to the parent of this
    /// forked process (then it is leaked: its emitter is the parent's).
    fn take(&self) -> Option<Span> {
        let span = self.inner.lock().ok()?.take()?;
        OPEN.fetch_sub(1, Relaxed);
        if self.generation != fork::generation() {
            std::mem::forget(span);
            return None;
        }
        Some(span)
    }

    fn with_span(&self, f: impl FnOnce(&mut Span)) -> PyResult<()> {
        if self.generation != fork::generation() {
            return Ok(());
        }
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("span lock poisoned"))?;
        if let Some(span) = inner.as_mut() {
            f(span);
        }
        Ok(())
    }
}

impl Drop for NativeSpan {
    fn drop(&mut self) {
        // A span never ended is reported by the worker span's own drop (`.exception`,
        // error_type `dropped`), except the parent's spans in a forked child.
        if let Ok(inner) = self.inner.get_mut()
            && let Some(span) = inner.take()
        {
            OPEN.fetch_sub(1, Relaxed);
            if self.generation != fork::generation() {
                std::mem::forget(span);
            }
        }
    }
}

#[pymethods]
impl NativeSpan {
    /// Starts a span (emits `OPERATION.start`): under `traceparent` if given, else as a child
    /// of `parent` if given, else as the root of a new trace.
    #[new]
    #[pyo3(signature = (client, operation, metadata = None, correlation_id = None,
        traceparent = None, parent = None))]
    fn new(
        client: &Bound<'_, Client>,
        operation: &str,
        metadata: Option<&Bound<'_, PyDict>>,
        correlation_id: Option<&str>,
        traceparent: Option<&str>,
        parent: Option<&Bound<'_, NativeSpan>>,
    ) -> PyResult<Self> {
        convert::check_operation(operation)?;
        let mut described = convert::Items::new();
        convert::fill(&mut described, metadata);
        convert::stringify(&mut described)?;
        let mut pairs = convert::Metadata::new();
        convert::metadata(&described, &mut pairs)?;
        let conn = client.get().conn()?;
        let span = match (traceparent, parent) {
            (Some(header), _) => {
                conn.emitter
                    .span_from(Some(header), operation, &pairs, correlation_id)
            }
            (None, Some(parent)) => {
                let parent = parent.get();
                conn.emitter.span_from(
                    Some(&parent.traceparent),
                    operation,
                    &pairs,
                    Some(correlation_id.unwrap_or(&parent.correlation_id)),
                )
            }
            (None, None) => conn.emitter.span(operation, &pairs, correlation_id),
        };
        let context = span.context();
        OPEN.fetch_add(1, Relaxed);
        Ok(Self {
            generation: fork::generation(),
            conn: conn.id(),
            operation: operation.to_owned(),
            trace_id: context.trace_id.to_string(),
            span_id: context.span_id.to_string(),
            parent_span_id: context.parent_span_id.map(|id| id.to_string()),
            traceparent: span.traceparent(),
            correlation_id: span.correlation_id().to_owned(),
            inner: Mutex::new(Some(span)),
        })
    }

    /// Records measurements for the event that ends the span (`.stop` or `.exception`).
    #[pyo3(signature = (**measurements))]
    fn set(&self, measurements: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let mut items = convert::Items::new();
        convert::fill(&mut items, measurements);
        let mut values = convert::Measurements::new();
        convert::measurements(&items, &mut values)?;
        self.with_span(|span| {
            for (key, value) in values {
                span.record(key, value);
            }
        })
    }

    /// Sets metadata for the event that ends the span.
    #[pyo3(signature = (**metadata))]
    fn set_metadata(&self, metadata: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let mut items = convert::Items::new();
        convert::fill(&mut items, metadata);
        convert::stringify(&mut items)?;
        let mut pairs = convert::Metadata::new();
        convert::metadata(&items, &mut pairs)?;
        self.with_span(|span| {
            for (key, value) in pairs {
                span.set_metadata(key, value);
            }
        })
    }

    /// Emits an event during the span, with its trace ids and correlation id.
    #[pyo3(signature = (name, measurements = None, metadata = None))]
    fn event(
        &self,
        name: &str,
        measurements: Option<&Bound<'_, PyDict>>,
        metadata: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        convert::with_event(name, measurements, metadata, |values, pairs| {
            if self.generation == fork::generation() {
                self.event_in(name, values, pairs);
            }
            Ok(())
        })
    }

    /// Ends the span: `OPERATION.stop`. Ending an ended span does nothing.
    fn stop(&self) {
        if let Some(span) = self.take() {
            span.stop();
        }
    }

    /// Ends the span with an error: `OPERATION.exception`.
    #[pyo3(signature = (error_type, message = ""))]
    fn exception(&self, error_type: &str, message: &str) {
        if let Some(span) = self.take() {
            span.exception(error_type, message);
        }
    }

    #[getter]
    fn operation(&self) -> &str {
        &self.operation
    }

    #[getter]
    fn trace_id(&self) -> &str {
        &self.trace_id
    }

    #[getter]
    fn span_id(&self) -> &str {
        &self.span_id
    }

    #[getter]
    fn parent_span_id(&self) -> Option<&str> {
        self.parent_span_id.as_deref()
    }

    #[getter]
    fn traceparent(&self) -> &str {
        &self.traceparent
    }

    #[getter]
    fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    #[getter]
    fn ended(&self) -> bool {
        self.inner
            .lock()
            .map(|inner| inner.is_none())
            .unwrap_or(true)
    }
}
