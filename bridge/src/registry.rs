//! Workers known to the hub, and their sessions.
//!
//! A worker is keyed by its id. It keeps its entry (counters, desired control, applied version)
//! across reconnects; each stream is a session with its own generation, so that a stream
//! replaced by a newer one cannot mark the worker disconnected when it finally ends.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use bridge_proto::{
    control::ControlState,
    identity::{InvalidName, NameKind, check_label_key, check_label_value, check_name},
    protocol::{MAX_SEQUENCE_JUMP, headers, hub_drops},
};
use dashmap::DashMap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};

/// Longest instance, host or GPU description accepted from metadata.
const MAX_NAME_LEN: usize = 256;

/// Who is on the other end of a `StreamTelemetry` stream, from its request metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub id: String,
    /// The hub made the id up because the client sent none.
    pub generated: bool,
    pub pool: String,
    pub pid: u32,
    pub labels: BTreeMap<String, String>,
    /// The client applies `ControlState` itself and acknowledges it.
    pub acknowledges: bool,
    pub peer: String,
    /// One run of the worker process (`x-worker-instance`); sequence numbers restart with it.
    pub instance: String,
    /// What GPUs the worker reported (`x-worker-gpu`).
    pub gpu: String,
    /// The machine it runs on (`x-worker-host`), empty when not said.
    pub host: String,
}

impl Identity {
    pub fn from_metadata(
        metadata: &MetadataMap,
        peer: Option<SocketAddr>,
        require_id: bool,
    ) -> Result<Self> {
        let text = |key: &str| -> Result<Option<String>> {
            match metadata.get(key) {
                None => Ok(None),
                Some(value) => {
                    let value = value
                        .to_str()
                        .map_err(|_| Error::invalid(format!("{key}: must be printable ASCII")))?
                        .trim();
                    check_text(key, value)?;
                    Ok((!value.is_empty()).then(|| value.to_owned()))
                }
            }
        };
        // Ids, pools and labels are checked as sent: no trimming, so " " is refused, not
        // taken for "absent".
        let name = |key: &str, kind: NameKind| -> Result<Option<String>> {
            let Some(value) = metadata.get(key) else {
                return Ok(None);
            };
            let value = value
                .to_str()
                .map_err(|_| Error::invalid(format!("{key}: must be printable ASCII")))?;
            check_name(kind, value).map_err(|e| Error::invalid(format!("{key}: {e}")))?;
            Ok(Some(value.to_owned()))
        };
        let (id, generated) = match name(headers::WORKER_ID, NameKind::WorkerId)? {
            Some(id) => (id, false),
            None if require_id => {
                return Err(Error::invalid(format!(
                    "{}: this hub requires workers to name themselves",
                    headers::WORKER_ID
                )));
            }
            None => (format!("anon-{:08x}", rand::random::<u32>()), true),
        };
        let pid = match text(headers::WORKER_PID)? {
            None => 0,
            Some(pid) => pid.parse().map_err(|_| {
                Error::invalid(format!(
                    "{}: `{pid}` is not a process id",
                    headers::WORKER_PID
                ))
            })?,
        };
        let mut labels = BTreeMap::new();
        for key in metadata.keys() {
            if let tonic::metadata::KeyRef::Ascii(key) = key
                && let Some(label) = key.as_str().strip_prefix(headers::WORKER_LABEL_PREFIX)
                && let Some(value) = metadata.get(key.as_str())
            {
                let invalid = |e: InvalidName| Error::invalid(format!("{}: {e}", key.as_str()));
                check_label_key(label).map_err(invalid)?;
                let value = value.to_str().map_err(|_| {
                    Error::invalid(format!("{}: must be printable ASCII", key.as_str()))
                })?;
                check_label_value(value).map_err(invalid)?;
                if !value.is_empty() {
                    labels.insert(label.to_owned(), value.to_owned());
                }
            }
        }
        Ok(Self {
            id,
            generated,
            pool: name(headers::WORKER_POOL, NameKind::Pool)?.unwrap_or_default(),
            pid,
            labels,
            acknowledges: text(headers::CONTROL_ACK)?.as_deref() == Some(headers::CONTROL_ACK_YES),
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            instance: text(headers::WORKER_INSTANCE)?.unwrap_or_default(),
            gpu: gpu_text(metadata)?,
            host: text(headers::WORKER_HOST)?.unwrap_or_default(),
        })
    }
}

/// `x-worker-gpu` is free text (device names have spaces); only its length is limited.
fn gpu_text(metadata: &MetadataMap) -> Result<String> {
    let key = headers::WORKER_GPU;
    let Some(value) = metadata.get(key) else {
        return Ok(String::new());
    };
    let value = value
        .to_str()
        .map_err(|_| Error::invalid(format!("{key}: must be printable ASCII")))?;
    if value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{key}: longer than {MAX_NAME_LEN} bytes"
        )));
    }
    Ok(value.trim().to_owned())
}

/// The other headers (instance, host): short, one word.
fn check_text(key: &str, value: &str) -> Result<()> {
    if value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{key}: longer than {MAX_NAME_LEN} bytes"
        )));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(format!(
            "{key}: `{value}` contains whitespace"
        )));
    }
    Ok(())
}

/// Why the hub did not deliver an event it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubDrop {
    Disabled,
    Filtered,
    SampledOut,
    /// Malformed name or a reserved name the worker may not send.
    Invalid,
    /// A replayed event this hub already received from the same worker process.
    Duplicate,
    /// Larger than `[limits]` allows (name tokens, entries or string length).
    OverLimit,
    /// Beyond the worker's `limits.worker_events_per_second`.
    RateLimited,
}

impl HubDrop {
    pub const ALL: [HubDrop; 7] = [
        HubDrop::Disabled,
        HubDrop::Filtered,
        HubDrop::SampledOut,
        HubDrop::Invalid,
        HubDrop::Duplicate,
        HubDrop::OverLimit,
        HubDrop::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HubDrop::Disabled => hub_drops::DISABLED,
            HubDrop::Filtered => hub_drops::FILTERED,
            HubDrop::SampledOut => hub_drops::SAMPLED_OUT,
            HubDrop::Invalid => hub_drops::INVALID,
            HubDrop::Duplicate => hub_drops::DUPLICATE,
            HubDrop::OverLimit => hub_drops::OVER_LIMIT,
            HubDrop::RateLimited => hub_drops::RATE_LIMITED,
        }
    }
}

/// Per-worker counters, updated on the ingest path without locks.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub delivered: AtomicU64,
    drops: [AtomicU64; HubDrop::ALL.len()],
    /// Highest sequence number received from the current worker process (0: none yet).
    pub last_sequence: AtomicU64,
    /// Sequence numbers skipped since this hub first heard from the worker process.
    pub missing: AtomicU64,
}

impl Counters {
    pub fn drop(&self, reason: HubDrop) {
        self.drops[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn drops(&self) -> impl Iterator<Item = (HubDrop, u64)> + '_ {
        HubDrop::ALL
            .into_iter()
            .map(|reason| (reason, self.drops[reason as usize].load(Relaxed)))
    }
    /// Follows the worker process's sequence numbers to `sequence`: the numbers it skipped are
    /// counted as missing, and one seen before is a replay (after a reconnect). A number more
    /// than [`MAX_SEQUENCE_JUMP`] past the last one (or past 0, for the first) is implausible:
    /// refused and not followed, so that one bad number (`u64::MAX`) can neither make every
    /// later event a "replay" nor count 1.8e19 events missing.
    pub fn follow_sequence(&self, sequence: u64) -> Sequenced {
        let seen = self.last_sequence.load(Relaxed);
        if sequence > seen && sequence - seen > MAX_SEQUENCE_JUMP {
            return Sequenced::Implausible;
        }
        let last = self.last_sequence.fetch_max(sequence, Relaxed);
        if sequence <= last {
            return Sequenced::Replay;
        }
        // Before the first event the hub has no idea what came earlier (another hub may have
        // received it), so only gaps after it count as missing.
        if last > 0 && sequence > last + 1 {
            self.missing.fetch_add(sequence - last - 1, Relaxed);
        }
        Sequenced::New
    }
}

/// Whether a numbered event is new to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequenced {
    New,
    /// Received before from the same worker process.
    Replay,
    /// Further past the last number than [`MAX_SEQUENCE_JUMP`].
    Implausible,
}

/// Events per second over a short sliding window, sampled by a once-a-second tick.
#[derive(Debug, Default)]
struct RateWindow {
    last_total: u64,
    per_second: [u64; 5],
    filled: usize,
    next: usize,
}

impl RateWindow {
    fn tick(&mut self, total: u64) {
        self.per_second[self.next] = total.saturating_sub(self.last_total);
        self.last_total = total;
        self.next = (self.next + 1) % self.per_second.len();
        self.filled = (self.filled + 1).min(self.per_second.len());
    }

    fn rate(&self) -> f64 {
        if self.filled == 0 {
            return 0.0;
        }
        self.per_second.iter().sum::<u64>() as f64 / self.filled as f64
    }
}

/// What changes only when a worker connects, disconnects or reports.
#[derive(Debug)]
pub struct WorkerDetails {
    pub pool: String,
    pub pid: u32,
    pub peer: String,
    pub labels: BTreeMap<String, String>,
    pub acknowledges: bool,
    pub gpu: String,
    pub host: String,
    /// The worker process whose sequence numbers `Counters::last_sequence` follows.
    instance: String,
    pub connected: bool,
    pub connected_since: SystemTime,
    pub disconnected_at: Option<SystemTime>,
    /// The worker's own counters from its last stats report.
    pub reported: BTreeMap<String, u64>,
    /// The last version sent and when, to time its acknowledgement.
    pub last_sent: Option<(u64, Instant)>,
    pub last_ack_latency: Option<Duration>,
    session: Option<SessionHandle>,
    rate: RateWindow,
}

#[derive(Debug)]
struct SessionHandle {
    generation: u64,
    pool: Arc<str>,
    cancel: CancellationToken,
    ended: Arc<Mutex<Option<tonic::Status>>>,
}

/// A worker known to the hub.
#[derive(Debug)]
pub struct Worker {
    pub id: String,
    pub counters: Counters,
    details: Mutex<WorkerDetails>,
    /// The state the hub wants the worker to apply; its current session streams it.
    control: watch::Sender<Arc<ControlState>>,
    /// The version the worker acknowledged on its current session (0: none yet).
    applied: watch::Sender<u64>,
}

impl Worker {
    pub fn details(&self) -> MutexGuard<'_, WorkerDetails> {
        self.details.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn desired(&self) -> Arc<ControlState> {
        self.control.borrow().clone()
    }

    pub fn watch_desired(&self) -> watch::Receiver<Arc<ControlState>> {
        self.control.subscribe()
    }

    /// Offers a newly computed desired state; an older one than the current is ignored, so
    /// concurrent updates cannot go backwards.
    pub fn offer_desired(&self, state: ControlState) -> bool {
        self.control.send_if_modified(|current| {
            if state.version > current.version
                || (state.version == current.version && **current != state)
            {
                *current = Arc::new(state);
                true
            } else {
                false
            }
        })
    }

    /// Replaces the desired state even with an older version (see `Push::Reload` in the hub).
    /// The applied version counted in the old numbers, so it is forgotten with them; the
    /// worker acknowledges the new state.
    pub fn reload_desired(&self, state: ControlState) {
        if state.version < self.control.borrow().version {
            self.applied.send_replace(0);
            self.control.send_replace(Arc::new(state));
        } else {
            self.offer_desired(state);
        }
    }

    pub fn applied_version(&self) -> Option<u64> {
        Some(*self.applied.borrow()).filter(|v| *v > 0)
    }

    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Records an acknowledgement; returns how long it took since the version was sent.
    pub fn acknowledge(&self, version: u64) -> Option<Duration> {
        self.applied.send_if_modified(|current| {
            let newer = version > *current;
            if newer {
                *current = version;
            }
            newer
        });
        let mut status = self.details();
        let latency = match status.last_sent {
            Some((sent, at)) if sent == version => Some(at.elapsed()),
            _ => None,
        };
        if latency.is_some() {
            status.last_ack_latency = latency;
        }
        latency
    }

    pub fn events_per_second(&self) -> f64 {
        self.details().rate.rate()
    }
}

/// An open stream of a worker.
#[derive(Debug, Clone)]
pub struct Session {
    pub worker: Arc<Worker>,
    /// The pool the worker named when it opened this stream.
    pub pool: Arc<str>,
    /// The labels it named then (`bridge subscribe --label` reads them for each event).
    pub labels: Arc<BTreeMap<String, String>>,
    /// Whether the client declared that it applies and acknowledges `ControlState`.
    pub acknowledges: bool,
    pub generation: u64,
    pub cancel: CancellationToken,
    /// Receipts owed to the worker for the numbered events of this stream.
    pub receipts: Arc<Receipts>,
    /// Why the hub ended the stream, when it did.
    ended: Arc<Mutex<Option<tonic::Status>>>,
}

/// The ingest loop records the last sequence number it processed; the control stream confirms
/// it to the worker, coalescing many events into one receipt.
#[derive(Debug, Default)]
pub struct Receipts {
    through: AtomicU64,
    /// The last sequence confirmed to the worker.
    confirmed: AtomicU64,
    pending: AtomicBool,
    full: AtomicBool,
    /// Something arrived that has not been confirmed.
    pub notify: tokio::sync::Notify,
    /// So much arrived that the worker's buffer should not wait for the delay.
    pub urgent: tokio::sync::Notify,
}

impl Receipts {
    /// Unconfirmed events after which a receipt goes out at once.
    pub const BATCH: u64 = 4096;

    /// Records that every event up to `sequence` was received; wakes the sender once per burst,
    /// and again when a batch's worth is waiting.
    #[inline]
    pub fn received(&self, sequence: u64) {
        self.through.fetch_max(sequence, Relaxed);
        if !self.pending.load(Relaxed) && !self.pending.swap(true, Relaxed) {
            self.notify.notify_one();
        }
        if sequence.saturating_sub(self.confirmed.load(Relaxed)) >= Self::BATCH
            && !self.full.swap(true, Relaxed)
        {
            self.urgent.notify_one();
        }
    }

    /// The sequence to confirm now, if anything new arrived since the last call.
    pub fn take(&self) -> Option<u64> {
        let through = self
            .pending
            .swap(false, Relaxed)
            .then(|| self.through.load(Relaxed))
            .filter(|through| *through > 0)?;
        self.confirmed.store(through, Relaxed);
        self.full.store(false, Relaxed);
        Some(through)
    }
}

impl Session {
    /// Ends the stream from the hub's side with `status`.
    pub fn end(&self, status: tonic::Status) {
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(status);
        self.cancel.cancel();
    }

    /// The status the hub ended the stream with, if it did.
    pub fn ended_with(&self) -> Option<tonic::Status> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// All workers, keyed by id.
#[derive(Debug)]
pub struct Registry {
    workers: DashMap<String, Arc<Worker>>,
    generations: AtomicU64,
    max_remembered: usize,
    /// Workers remembered while disconnected, so that trimming them costs nothing until
    /// there are too many.
    disconnected: AtomicUsize,
}

/// What [`Registry::open`] did.
#[derive(Debug)]
pub struct Opened {
    pub session: Session,
    /// The session this one replaced, already ended.
    pub replaced: Option<Session>,
}

impl Registry {
    pub fn new(max_remembered: usize) -> Self {
        Self {
            workers: DashMap::new(),
            generations: AtomicU64::new(0),
            max_remembered,
            disconnected: AtomicUsize::new(0),
        }
    }

    /// Opens a session for `identity`, replacing the worker's current one. The new session
    /// starts unacknowledged with `initial` as its desired state (which only ever replaces an
    /// older state).
    pub fn open(
        &self,
        identity: &Identity,
        parent: &CancellationToken,
        initial: impl FnOnce() -> ControlState,
    ) -> Opened {
        let worker = self
            .workers
            .entry(identity.id.clone())
            .or_insert_with(|| {
                Arc::new(Worker {
                    id: identity.id.clone(),
                    counters: Counters::default(),
                    details: Mutex::new(WorkerDetails {
                        pool: identity.pool.clone(),
                        pid: 0,
                        peer: String::new(),
                        labels: BTreeMap::new(),
                        acknowledges: false,
                        gpu: String::new(),
                        host: String::new(),
                        instance: String::new(),
                        connected: false,
                        connected_since: SystemTime::now(),
                        disconnected_at: None,
                        reported: BTreeMap::new(),
                        last_sent: None,
                        last_ack_latency: None,
                        session: None,
                        rate: RateWindow::default(),
                    }),
                    control: watch::Sender::new(Arc::new(ControlState::default())),
                    applied: watch::Sender::new(0),
                })
            })
            .clone();
        let generation = self.generations.fetch_add(1, Relaxed) + 1;
        let session = Session {
            worker: worker.clone(),
            pool: identity.pool.as_str().into(),
            labels: Arc::new(identity.labels.clone()),
            acknowledges: identity.acknowledges,
            generation,
            cancel: parent.child_token(),
            receipts: Arc::default(),
            ended: Arc::new(Mutex::new(None)),
        };
        let previous = {
            let mut status = worker.details();
            status.pool.clone_from(&identity.pool);
            status.pid = identity.pid;
            status.peer.clone_from(&identity.peer);
            status.labels.clone_from(&identity.labels);
            status.acknowledges = identity.acknowledges;
            status.gpu.clone_from(&identity.gpu);
            status.host.clone_from(&identity.host);
            if identity.instance.is_empty() || status.instance != identity.instance {
                // A new process numbers its events from 1 again.
                status.instance.clone_from(&identity.instance);
                worker.counters.last_sequence.store(0, Relaxed);
            }
            status.connected = true;
            status.connected_since = SystemTime::now();
            if status.disconnected_at.take().is_some() {
                self.disconnected.fetch_sub(1, Relaxed);
            }
            status.reported.clear();
            status.last_sent = None;
            status.session.replace(SessionHandle {
                generation,
                pool: session.pool.clone(),
                cancel: session.cancel.clone(),
                ended: session.ended.clone(),
            })
        };
        // Computed after the worker is visible (and its pool set), so that a concurrent control
        // change either sees this worker or is already part of `initial()`.
        worker.offer_desired(initial());
        worker.applied.send_replace(0);
        let replaced = previous.map(|handle| {
            let old = Session {
                worker: worker.clone(),
                pool: handle.pool,
                labels: Arc::default(),
                acknowledges: false,
                generation: handle.generation,
                cancel: handle.cancel,
                receipts: Arc::default(),
                ended: handle.ended,
            };
            old.end(tonic::Status::aborted(format!(
                "worker `{}` opened a newer stream; this one is replaced",
                identity.id
            )));
            old
        });
        Opened { session, replaced }
    }

    /// Marks the worker disconnected if `session` is still its current one. Returns whether it
    /// was.
    pub fn close(&self, session: &Session) -> bool {
        let closed = {
            let mut status = session.worker.details();
            let current = status
                .session
                .as_ref()
                .is_some_and(|h| h.generation == session.generation);
            if current {
                status.session = None;
                status.connected = false;
                status.disconnected_at = Some(SystemTime::now());
                // Counted under the status lock, so a concurrent reconnect's decrement follows.
                self.disconnected.fetch_add(1, Relaxed);
            }
            current
        };
        if closed && self.disconnected.load(Relaxed) > self.max_remembered {
            self.forget_oldest_disconnected();
        }
        closed
    }

    fn forget_oldest_disconnected(&self) {
        let mut disconnected: Vec<(SystemTime, String)> = self
            .workers
            .iter()
            .filter_map(|w| {
                let status = w.details();
                status.disconnected_at.map(|at| (at, w.id.clone()))
            })
            .collect();
        disconnected.sort();
        let excess = disconnected.len().saturating_sub(self.max_remembered);
        for (_, id) in disconnected.into_iter().take(excess) {
            if self
                .workers
                .remove_if(&id, |_, w| !w.details().connected)
                .is_some()
            {
                self.disconnected.fetch_sub(1, Relaxed);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Worker>> {
        self.workers.get(id).map(|w| w.clone())
    }

    /// Every worker, in no particular order.
    pub fn unordered(&self) -> Vec<Arc<Worker>> {
        self.workers.iter().map(|w| w.clone()).collect()
    }

    /// Every worker, in id order.
    pub fn all(&self) -> Vec<Arc<Worker>> {
        let mut all: Vec<_> = self.workers.iter().map(|w| w.clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Ends every open session with `status` (hub shutdown).
    pub fn end_all(&self, status: &tonic::Status) {
        for worker in self.workers.iter() {
            let handle = worker
                .details()
                .session
                .as_ref()
                .map(|h| (h.cancel.clone(), h.ended.clone()));
            if let Some((cancel, ended)) = handle {
                ended
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| status.clone());
                cancel.cancel();
            }
        }
    }

    /// Advances every worker's events-per-second window; called once a second.
    pub fn tick_rates(&self) {
        for worker in self.workers.iter() {
            let total = worker.counters.received.load(Relaxed);
            worker.details().rate.tick(total);
        }
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Workers with an open stream.
    pub fn connected(&self) -> usize {
        self.workers
            .len()
            .saturating_sub(self.disconnected.load(Relaxed))
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (k, v) in pairs {
            map.insert(*k, MetadataValue::try_from(*v).unwrap());
        }
        map
    }

    #[test]
    fn identity_from_metadata() {
        let id = Identity::from_metadata(
            &metadata(&[
                ("x-worker-id", "gpu-3"),
                ("x-worker-pool", "llama"),
                ("x-worker-pid", "4242"),
                ("x-worker-label-zone", "b"),
                ("x-bridge-control-ack", "1"),
            ]),
            None,
            false,
        )
        .unwrap();
        assert_eq!(
            (id.id.as_str(), id.pool.as_str(), id.pid),
            ("gpu-3", "llama", 4242)
        );
        assert_eq!(id.labels["zone"], "b");
        assert!(id.acknowledges && !id.generated);

        let anon = Identity::from_metadata(&MetadataMap::new(), None, false).unwrap();
        assert!(anon.generated && anon.id.starts_with("anon-") && !anon.acknowledges);
        assert!(Identity::from_metadata(&MetadataMap::new(), None, true).is_err());
        let err = Identity::from_metadata(&metadata(&[("x-worker-pid", "abc")]), None, false)
            .unwrap_err();
        assert!(err.to_string().contains("x-worker-pid"));
    }

    /// Ids, pools and labels follow `bridge_proto::identity`: a path, a lone space or a quote
    /// is refused, naming the header, instead of ending up in logs, metrics and subjects.
    #[test]
    fn names_outside_the_rule_are_refused() {
        for (key, value) in [
            ("x-worker-id", "../../etc/passwd"),
            ("x-worker-id", " "),
            ("x-worker-id", "inj\",forged=\"yes"),
            ("x-worker-pool", "a b"),
            ("x-worker-pool", ".."),
            ("x-worker-label-z.one", "b"),
            ("x-worker-label-zone", &"v".repeat(300)),
        ] {
            let error = Identity::from_metadata(&metadata(&[(key, value)]), None, false)
                .expect_err(value)
                .to_string();
            assert!(error.starts_with(key), "{error}");
            let status = tonic::Status::from(Error::invalid(error));
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
        let labelled = metadata(&[
            ("x-worker-id", "w-1.a_b"),
            ("x-worker-label-zone", "us east"),
        ]);
        let identity = Identity::from_metadata(&labelled, None, false).unwrap();
        assert_eq!(identity.labels["zone"], "us east");
    }

    /// One absurd sequence number is refused instead of followed: the numbers after it are
    /// still new, and what is missing stays what was skipped.
    #[test]
    fn an_implausible_sequence_jump_is_refused_not_followed() {
        let counters = Counters::default();
        assert_eq!(counters.follow_sequence(1), Sequenced::New);
        assert_eq!(counters.follow_sequence(u64::MAX), Sequenced::Implausible);
        assert_eq!(
            counters.follow_sequence(2 + MAX_SEQUENCE_JUMP),
            Sequenced::Implausible
        );
        assert_eq!(counters.follow_sequence(2), Sequenced::New);
        assert_eq!(counters.follow_sequence(5), Sequenced::New);
        assert_eq!(counters.follow_sequence(5), Sequenced::Replay);
        assert_eq!(counters.missing.load(Relaxed), 2);
        assert_eq!(counters.last_sequence.load(Relaxed), 5);
        // Within the bound, a long gap (a worker that dropped much while cut off) is followed.
        assert_eq!(
            counters.follow_sequence(5 + MAX_SEQUENCE_JUMP),
            Sequenced::New
        );
        // And a first number beyond it, from a process this hub never heard from, is refused.
        let fresh = Counters::default();
        assert_eq!(
            fresh.follow_sequence(MAX_SEQUENCE_JUMP + 1),
            Sequenced::Implausible
        );
        assert_eq!(fresh.last_sequence.load(Relaxed), 0);
    }

    #[test]
    fn a_replaced_session_does_not_disconnect_the_worker() {
        let registry = Registry::new(10);
        let root = CancellationToken::new();
        let identity =
            Identity::from_metadata(&metadata(&[("x-worker-id", "w")]), None, false).unwrap();
        let first = registry
            .open(&identity, &root, ControlState::default)
            .session;
        let second = registry.open(&identity, &root, ControlState::default);
        assert!(first.cancel.is_cancelled());
        assert_eq!(second.replaced.unwrap().generation, first.generation);
        assert_eq!(first.ended_with().unwrap().code(), tonic::Code::Aborted);
        assert!(!registry.close(&first));
        assert!(registry.get("w").unwrap().details().connected);
        assert!(registry.close(&second.session));
        assert!(!registry.get("w").unwrap().details().connected);
    }

    #[test]
    fn forgets_the_oldest_disconnected_workers_beyond_the_limit() {
        let registry = Registry::new(2);
        let root = CancellationToken::new();
        for i in 0..4 {
            let identity = Identity::from_metadata(
                &metadata(&[("x-worker-id", &format!("w{i}"))]),
                None,
                false,
            )
            .unwrap();
            let opened = registry.open(&identity, &root, ControlState::default);
            registry.close(&opened.session);
        }
        let ids: Vec<_> = registry.all().iter().map(|w| w.id.clone()).collect();
        assert_eq!(ids, ["w2", "w3"]);
    }
}
