//! [`Client`]: a link to the hub and the emitter that feeds it, on a Tokio runtime of its own.
//!
//! `emit` runs on the caller's thread with the GIL held: it checks, encodes and buffers (a few
//! hundred nanoseconds), never waits on the network and never blocks on the I/O thread for long
//! (the buffer's lock is held only to push or take events). What may wait, `close`, releases the
//! GIL.
//!
//! After a fork the child's first use makes a new link ([`Client::conn`]): a new runtime, a new
//! instance id, and the worker id `ID.PID`, because the hub lets one stream per worker id live
//! (a second one replaces the first, and the two would take it from each other forever). The
//! parent's runtime and link are leaked in the child, never dropped: their threads are gone and
//! their locks may have been held at the fork.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use arc_swap::{ArcSwap, Guard};
use bridge_proto::{connect::ClientSecurity, control::ControlState};
use pyo3::{exceptions::PyValueError, prelude::*, types::PyDict};
use tokio::runtime::Runtime;
use worker::{Emitter, Link, LinkOptions, LinkState, counters::Snapshot};

use crate::{convert, fork};

/// One link, in the process generation that made it.
#[derive(Debug)]
pub(crate) struct Conn {
    generation: u64,
    /// The worker id this link reports as.
    worker_id: String,
    pub(crate) emitter: Emitter,
    /// `None` once closed (or for a child's stand-in after `close`).
    io: Mutex<Option<Io>>,
}

#[derive(Debug)]
struct Io {
    runtime: Runtime,
    link: Link,
}

impl Conn {
    fn start(options: LinkOptions) -> PyResult<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .thread_name("telemetry-bridge-io")
            .enable_all()
            .build()?;
        let options_id = options.id.clone();
        let link = {
            let _entered = runtime.enter();
            Link::start(options).map_err(|e| PyValueError::new_err(e.to_string()))?
        };
        Ok(Self {
            generation: fork::generation(),
            worker_id: options_id,
            emitter: link.emitter(),
            io: Mutex::new(Some(Io { runtime, link })),
        })
    }

    /// A stand-in with no link, disabled: what a closed client emits into.
    fn closed(worker_id: String) -> Self {
        let emitter = Emitter::detached(1);
        disable(&emitter);
        Self {
            generation: fork::generation(),
            worker_id,
            emitter,
            io: Mutex::new(None),
        }
    }

    /// The link's state, if it has one.
    fn state(&self) -> Option<LinkState> {
        let io = self.io.lock().ok()?;
        io.as_ref().map(|io| io.link.state().borrow().clone())
    }

    /// An identity for spans to check that they belong to this link.
    pub(crate) fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let io = self.io.get_mut().map(Option::take).unwrap_or_default();
        if self.generation != fork::generation() {
            // The parent's: its threads are gone in this child; dropping the runtime would
            // wait for them forever.
            std::mem::forget(io);
        } else if let Some(io) = io {
            io.runtime.shutdown_background();
        }
    }
}

/// Applies "disabled" locally, so that what is emitted after `close` is counted as disabled.
fn disable(emitter: &Emitter) {
    let now = emitter.control();
    emitter.apply_control(ControlState::new(
        now.version,
        false,
        now.default_rate,
        now.rules().to_vec(),
        now.allow.clone(),
        now.block.clone(),
    ));
}

/// The native half of `telemetry_bridge.Telemetry`.
#[pyclass(subclass, frozen, module = "telemetry_bridge._native", name = "Client")]
#[derive(Debug)]
pub struct Client {
    /// As given: a forked child's link is made from these with its own worker id and pid.
    options: LinkOptions,
    conn: ArcSwap<Conn>,
    closed: AtomicBool,
}

impl Client {
    /// This process's link: made anew on first use in a forked child.
    #[inline]
    pub(crate) fn conn(&self) -> PyResult<Guard<Arc<Conn>>> {
        let conn = self.conn.load();
        if conn.generation == fork::generation() {
            return Ok(conn);
        }
        drop(conn);
        self.relink()?;
        Ok(self.conn.load())
    }

    #[cold]
    fn relink(&self) -> PyResult<Arc<Conn>> {
        let mut options = self.options.clone();
        options.pid = std::process::id();
        if !options.id.is_empty() {
            options.id = format!("{}.{}", options.id, options.pid);
        }
        let fresh = if self.closed.load(Relaxed) {
            Conn::closed(options.id)
        } else {
            Conn::start(options)?
        };
        let fresh = Arc::new(fresh);
        let stale = self.conn.swap(fresh.clone());
        drop(stale);
        Ok(fresh)
    }
}

fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: {value} is not a number of seconds (0 or more)"
        ))
    })
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (hub, worker_id, *, pool = "", labels = None, token = None, ca = None,
        cert = None, key = None, buffer_events = None, linger = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        hub: &str,
        worker_id: &str,
        pool: &str,
        labels: Option<Vec<(String, String)>>,
        token: Option<String>,
        ca: Option<std::path::PathBuf>,
        cert: Option<std::path::PathBuf>,
        key: Option<std::path::PathBuf>,
        buffer_events: Option<usize>,
        linger: Option<f64>,
    ) -> PyResult<Self> {
        let mut options = LinkOptions::new(hub, worker_id);
        options.pool = pool.to_owned();
        for (key, _) in labels.iter().flatten() {
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(PyValueError::new_err(format!(
                    "label `{key}`: label keys are letters, digits, '-' and '_'"
                )));
            }
        }
        options.labels = labels.unwrap_or_default();
        options.security = ClientSecurity {
            token,
            ca,
            cert,
            key,
        };
        if let Some(events) = buffer_events {
            if events == 0 {
                return Err(PyValueError::new_err("buffer_events: must be at least 1"));
            }
            options.buffer_events = events;
        }
        if let Some(linger) = linger {
            options.linger = seconds("linger", linger)?;
        }
        worker::link::validate(&options).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let conn = Conn::start(options.clone())?;
        Ok(Self {
            options,
            conn: ArcSwap::from_pointee(conn),
            closed: AtomicBool::new(false),
        })
    }

    /// Emits one event. See `telemetry_bridge.Telemetry.emit`.
    #[pyo3(signature = (name, measurements = None, metadata = None, correlation_id = None))]
    fn emit(
        &self,
        py: Python<'_>,
        name: &str,
        measurements: Option<&Bound<'_, PyDict>>,
        metadata: Option<&Bound<'_, PyDict>>,
        correlation_id: Option<&str>,
    ) -> PyResult<()> {
        convert::with_event(name, measurements, metadata, |values, pairs| {
            let conn = self.conn()?;
            // Inside a span (of this link), an event joins the span's trace: sampled with it
            // and shown with it. Looking that up is skipped when nothing is let through anyway.
            if correlation_id.is_none()
                && crate::emit_in_current_span(py, &conn, name, values, pairs)?
            {
                return Ok(());
            }
            conn.emitter.emit(name, values, pairs, correlation_id);
            Ok(())
        })
    }

    /// What became of every event so far: the counters of `bridge.worker.stats`, plus
    /// `dropped` (all the `dropped.*` together).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = self.conn()?.emitter.counters();
        stats_dict(py, &snapshot)
    }

    /// The link's state: `connecting`, `connected`, `disconnected: WHY` or `closed`.
    #[getter]
    fn link_state(&self) -> PyResult<String> {
        Ok(match self.conn()?.state() {
            None | Some(LinkState::Closed) => "closed".to_owned(),
            Some(LinkState::Connecting) => "connecting".to_owned(),
            Some(LinkState::Connected { .. }) => "connected".to_owned(),
            Some(LinkState::Disconnected { error }) => format!("disconnected: {error}"),
        })
    }

    /// The worker id this process reports as (`ID.PID` in a forked child).
    #[getter]
    fn worker_id(&self) -> PyResult<String> {
        Ok(self.conn()?.worker_id.clone())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Sends what is buffered and waits up to `timeout` seconds for the hub to confirm it, then
    /// stops the link. Returns the final counters. Later emits are counted as disabled.
    #[pyo3(signature = (timeout = 5.0))]
    fn close<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyDict>> {
        let timeout = seconds("timeout", timeout)?;
        self.closed.store(true, Relaxed);
        // In a forked child that never used this handle (say, at exit), there is nothing of
        // the child's to drain: it gets a closed stand-in rather than a link made to be closed.
        let conn = self.conn()?;
        let io = conn.io.lock().ok().and_then(|mut io| io.take());
        if let Some(Io { runtime, link }) = io {
            py.detach(|| {
                runtime.block_on(link.close(timeout));
                runtime.shutdown_timeout(Duration::from_millis(100));
            });
        }
        disable(&conn.emitter);
        stats_dict(py, &conn.emitter.counters())
    }
}

fn stats_dict<'py>(py: Python<'py>, snapshot: &Snapshot) -> PyResult<Bound<'py, PyDict>> {
    use bridge_proto::protocol::counters::DROPPED_PREFIX;
    let dict = PyDict::new(py);
    let mut dropped = 0;
    for (key, value) in snapshot.measurements() {
        if key.starts_with(DROPPED_PREFIX) {
            dropped += value;
        }
        dict.set_item(key, value)?;
    }
    dict.set_item("dropped", dropped)?;
    Ok(dict)
}
