//! The hub: workers, outputs and the control plane behind one cheap-clone handle.

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock, atomic::Ordering::Relaxed},
    time::{Duration, Instant, SystemTime},
};

use bridge_proto::{
    batch::Labels,
    protocol::events::{
        CLUSTER_CONNECTED, CLUSTER_DISCONNECTED, WORKER_CONNECTED, WORKER_DISCONNECTED,
    },
    v1,
    view::EventView,
};
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    auth::Authenticator,
    cluster::{self, ClusterLink, rpc},
    command::{Change, Selector, Update},
    config::Config,
    connection_threads::ThreadLoad,
    control::{
        ControlPlane,
        layer::Layer,
        target::EventRate,
        timed::{self, Reverted},
    },
    error::{Error, Result},
    latency::{INGEST_BOUNDS_NS, LatencyHistogram, unix_nanos},
    outputs::{
        Delivery, Outputs,
        inference_metrics::InferenceMetrics,
        otlp::{OtlpExport, WorkerDescription, WorkerDirectory},
        subscribers::{Feed, Filter, Subscribers, Subscription, linger_of},
    },
    registry::{Identity, Registry, Session, Worker},
    tls::ServerTls,
};

#[derive(Debug)]
struct Shared {
    config: Config,
    registry: Registry,
    /// Where every event the hub passes on goes.
    outputs: Outputs,
    /// One of the outputs, which the hub opens subscriptions on.
    subscribers: Subscribers,
    /// One of the outputs, which `/metrics` reads.
    inference_metrics: InferenceMetrics,
    /// Set when the hub joins a cluster.
    cluster: OnceLock<Arc<ClusterLink>>,
    /// Set when the hub exports over OTLP.
    otlp: OnceLock<Arc<OtlpExport>>,
    control: ControlPlane,
    auth: Authenticator,
    /// `[tls]`, read at start so that both ports serve the same, checked, files.
    tls: Option<ServerTls>,
    /// From an event's timestamp to the hub receiving it, for events that passed.
    ingest_latency: LatencyHistogram,
    /// The connections each of `[hub] connection_threads` has open.
    connection_load: ThreadLoad,
    /// Cancelled when the hub shuts down; every stream's token is a child.
    shutdown: CancellationToken,
}

/// Why desired states are pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Push {
    /// A change: a state older than a worker's current one is stale and ignored.
    Change,
    /// The cluster's state, loaded afresh: it wins even when its versions are lower (a
    /// recreated bucket numbers them from 1 again).
    Reload,
}

/// Who asked for a control change, for the log line every change writes.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    /// The name of the token presented, when the hub has tokens.
    pub token: Option<&'a str>,
    /// The interface the request came in on: "grpc" or "http".
    pub via: &'static str,
    pub peer: Option<std::net::SocketAddr>,
}

/// The hub; clone it freely.
#[derive(Debug, Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

impl Hub {
    /// Opens the control state in the configured state directory.
    pub fn new(config: Config) -> Result<Self> {
        let state_dir = config.hub.resolved_state_dir();
        let auth = Authenticator::new(&config.auth).map_err(Error::InvalidArgument)?;
        let tls = ServerTls::load(&config.tls).map_err(Error::InvalidArgument)?;
        let control = ControlPlane::open(&config.control, &state_dir, config.cluster.enabled())?;
        info!(state_file = %control.state_file().display(), "control state loaded");
        let subscribers = Subscribers::new(config.hub.subscriber_queue);
        let outputs = Outputs::default();
        outputs.add(Arc::new(subscribers.clone()));
        // Not among the outputs: each worker stream records into it (`worker_stream`).
        let inference_metrics = InferenceMetrics::new(config.metrics.max_models_per_pool);
        Ok(Self {
            shared: Arc::new(Shared {
                registry: Registry::new(config.hub.max_remembered_workers),
                outputs,
                subscribers,
                inference_metrics,
                cluster: OnceLock::new(),
                otlp: OnceLock::new(),
                control,
                auth,
                tls,
                ingest_latency: LatencyHistogram::new(INGEST_BOUNDS_NS),
                connection_load: ThreadLoad::new(config.hub.connection_threads),
                shutdown: CancellationToken::new(),
                config,
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn auth(&self) -> &Authenticator {
        &self.shared.auth
    }

    /// The TLS both ports serve, when `[tls]` is set.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.shared.tls.as_ref()
    }

    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    pub fn ingest_latency(&self) -> &LatencyHistogram {
        &self.shared.ingest_latency
    }

    /// The hand-off point to every output.
    pub fn outputs(&self) -> &Outputs {
        &self.shared.outputs
    }

    pub fn subscribers(&self) -> &Subscribers {
        &self.shared.subscribers
    }

    pub fn inference_metrics(&self) -> &InferenceMetrics {
        &self.shared.inference_metrics
    }

    pub fn control(&self) -> &ControlPlane {
        &self.shared.control
    }

    /// The hub's link to the other hubs, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<ClusterLink>> {
        self.shared.cluster.get()
    }

    /// The connections each connection thread has open (none on the shared runtime).
    pub fn connection_load(&self) -> &ThreadLoad {
        &self.shared.connection_load
    }

    /// The OTLP export, when it runs.
    pub fn otlp(&self) -> Option<&Arc<OtlpExport>> {
        self.shared.otlp.get()
    }

    /// Starts exporting to `[export.otlp]`'s collector, when one is configured: one more
    /// output. Once only.
    pub fn start_export(&self) -> std::result::Result<(), String> {
        let config = &self.shared.config.export.otlp;
        if !config.enabled() || self.shared.otlp.get().is_some() {
            return Ok(());
        }
        let export = Arc::new(OtlpExport::start(
            config,
            Arc::new(self.clone()),
            self.shared.inference_metrics.clone(),
            self.shared.shutdown.clone(),
        )?);
        info!(endpoint = %config.endpoint.trim(), logs = ?config.logs, traces = config.traces, "exporting over OTLP");
        if self.shared.otlp.set(export.clone()).is_ok() {
            self.shared.outputs.add(export);
        }
        Ok(())
    }

    /// Shares events, workers and control with the other hubs of a cluster from now on: the
    /// cluster publisher becomes one more output, and subscriptions opened from now on also
    /// receive other hubs' events. Once only; later calls change nothing.
    pub fn join_cluster(&self, link: Arc<ClusterLink>) {
        if self.shared.cluster.set(link.clone()).is_err() {
            return;
        }
        self.shared.outputs.add(link.publisher());
        cluster::start(self.clone(), link);
    }

    /// Takes the cluster's control state, just loaded, and pushes it to every worker. The
    /// `refused` levels did not validate and keep the settings this hub held for them.
    pub async fn load_cluster_state(
        &self,
        layers: Vec<(Selector, Layer)>,
        refused: &[Selector],
        epoch: u64,
    ) {
        let control = &self.shared.control;
        let _changes = control.lock_changes().await;
        control.load_cluster(layers, refused, epoch);
        self.push(&Selector::All, Push::Reload);
    }

    /// Takes a level of the cluster's control state that changed, and pushes it to the
    /// workers it applies to.
    pub async fn apply_cluster_layer(&self, selector: &Selector, layer: Layer) {
        let control = &self.shared.control;
        let _changes = control.lock_changes().await;
        if control.set_layer(selector, layer) {
            self.push(selector, Push::Change);
        }
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shared.shutdown
    }

    /// Ends every worker stream and subscription with UNAVAILABLE.
    /// Flushes the control state file to disk.
    pub fn flush_state(&self) -> Result<()> {
        self.shared.control.flush()
    }

    pub fn shut_down(&self) {
        self.shared
            .registry
            .end_all(&tonic::Status::unavailable("the hub is shutting down"));
        self.shared.shutdown.cancel();
    }

    /// Opens a session for a worker stream and announces it to subscribers.
    pub fn connect(&self, identity: &Identity) -> Session {
        let control = &self.shared.control;
        let opened = self
            .shared
            .registry
            .open(identity, &self.shared.shutdown, || {
                control.effective(Some(&identity.id), &identity.pool, &identity.labels)
            });
        if let Some(old) = &opened.replaced {
            info!(worker.id = %identity.id, "worker reconnected; its previous stream is replaced");
            self.announce_disconnected(&old.worker, "replaced by a newer stream");
        }
        info!(
            worker.id = %identity.id,
            worker.pool = %identity.pool,
            worker.pid = identity.pid,
            peer = %identity.peer,
            generated_id = identity.generated,
            acknowledges = identity.acknowledges,
            gpu = %identity.gpu,
            control.version = opened.session.worker.desired().version,
            "worker connected"
        );
        let mut metadata = std::collections::HashMap::from([
            ("pool".to_owned(), identity.pool.clone()),
            ("peer".to_owned(), identity.peer.clone()),
            ("acknowledges".to_owned(), identity.acknowledges.to_string()),
        ]);
        if identity.pid != 0 {
            metadata.insert("pid".into(), identity.pid.to_string());
        }
        if !identity.gpu.is_empty() {
            metadata.insert("gpu".into(), identity.gpu.clone());
        }
        for (key, value) in &identity.labels {
            metadata.insert(format!("label.{key}"), value.clone());
        }
        self.publish_lifecycle(
            &identity.id,
            &identity.pool,
            &opened.session.labels,
            &WORKER_CONNECTED,
            metadata,
            Default::default(),
        );
        opened.session
    }

    /// Closes a session; announces the disconnect if it was the worker's current one.
    pub fn disconnect(&self, session: &Session, reason: &str) {
        session.cancel.cancel();
        if self.shared.registry.close(session) {
            info!(worker.id = %session.worker.id, reason, "worker disconnected");
            self.announce_disconnected(&session.worker, reason);
        }
    }

    fn announce_disconnected(&self, worker: &Worker, reason: &str) {
        let (pool, labels) = {
            let details = worker.details();
            (details.pool.clone(), Arc::new(details.labels.clone()))
        };
        let received = worker.counters.received.load(Relaxed);
        self.publish_lifecycle(
            &worker.id,
            &pool,
            &labels,
            &WORKER_DISCONNECTED,
            [("reason".to_owned(), reason.to_owned())].into(),
            [(
                "events_received".to_owned(),
                v1::TelemetryValue {
                    value: Some(v1::telemetry_value::Value::IntValue(
                        i64::try_from(received).unwrap_or(i64::MAX),
                    )),
                },
            )]
            .into(),
        );
    }

    /// Tells subscribers that this hub's NATS connection came up or went down.
    pub fn announce_cluster(&self, node: &str, connected: bool) {
        let (name, note) = if connected {
            (
                &CLUSTER_CONNECTED,
                "events from other hubs flow to this hub's subscribers",
            )
        } else {
            (
                &CLUSTER_DISCONNECTED,
                "events from other hubs may be missing until this hub reconnects",
            )
        };
        self.publish_lifecycle(
            node,
            "",
            &Labels::default(),
            name,
            [("note".to_owned(), note.to_owned())].into(),
            Default::default(),
        );
    }

    fn publish_lifecycle(
        &self,
        worker_id: &str,
        pool: &str,
        labels: &Labels,
        name: &[&str],
        metadata: std::collections::HashMap<String, String>,
        measurements: std::collections::HashMap<String, v1::TelemetryValue>,
    ) {
        let now = unix_nanos(SystemTime::now());
        let event = v1::TelemetryEvent {
            event_parts: name.iter().map(|s| (*s).to_owned()).collect(),
            measurements,
            metadata,
            timestamp_ns: now,
            ..Default::default()
        };
        if let Ok(event) = EventView::from_event(&event) {
            let delivery =
                Delivery::local(worker_id, pool, &event, 1.0, now).with_worker_labels(labels);
            self.shared.outputs.publish(&delivery);
        }
    }

    /// Opens the subscription `request` asks for, as the stream of deliveries every transport
    /// serves: refused if its filter or linger is not valid, or if the hub already serves
    /// `limits.max_subscribers`.
    pub fn subscribe(&self, request: v1::SubscribeRequest) -> Result<Feed> {
        let linger = linger_of(&request)?;
        let filter = Filter::try_from(request)?;
        Ok(self
            .open_subscription(filter)?
            .into_feed(self.shutdown_token().clone(), linger))
    }

    fn open_subscription(&self, filter: Filter) -> Result<Subscription> {
        let limit = self.shared.config.limits.max_subscribers;
        if self.shared.subscribers.subscriber_count() >= limit {
            return Err(Error::Limit(format!(
                "this hub serves at most {limit} subscriptions (limits.max_subscribers)"
            )));
        }
        let subscription = self.shared.subscribers.subscribe(filter);
        if let Some(link) = self.cluster() {
            link.receive_while(subscription.closed());
        }
        Ok(subscription)
    }

    /// Applies an operator's change, pushes the new state to the workers it reaches, and waits
    /// up to `wait` for the connected ones that acknowledge control to apply it. A timed change
    /// reverts when its time is up (see `reverts`).
    ///
    /// In cluster mode the change is written to the cluster's state, which every hub (this one
    /// included) follows, and the acknowledgements come from every hub.
    pub async fn update_control(
        &self,
        update: &Update,
        requester: Requester<'_>,
    ) -> Result<v1::UpdateControlResponse> {
        let Update {
            selector,
            change,
            wait,
            lasting,
        } = update;
        let wait = *wait;
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if let Selector::Worker(id) = selector
            && !self.knows_worker(id).await
        {
            return Err(Error::UnknownWorker(id.clone()));
        }
        let until = lasting.map(|lasting| {
            let millis = u64::try_from(lasting.as_millis()).unwrap_or(u64::MAX);
            timed::now_ms().saturating_add(millis)
        });
        let started_from;
        let change = match change {
            Change::Target { goal, .. } => {
                started_from = Change::Target {
                    goal: *goal,
                    start: self.current_rate(selector).await,
                };
                &started_from
            }
            change => change,
        };
        let mut response = match self.cluster() {
            Some(link) => {
                let started = Instant::now();
                let version =
                    cluster::control::write(&link.buckets()?.control, selector, change, until)
                        .await?;
                let written_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                // The workers it reaches are each hub's to tell.
                log_change(selector, change, version, until, None, requester);
                let (local, mut response) = tokio::join!(
                    self.local_acknowledgements(selector, version, wait),
                    link.remote_acknowledgements(selector, version, wait)
                );
                response.targets.splice(0..0, local);
                // Each hub counted from its push to the acknowledgement; the write came first.
                for target in response.targets.iter_mut().filter(|t| t.applied) {
                    target.ack_latency_us = target.ack_latency_us.saturating_add(written_us);
                }
                response
            }
            None => {
                let started = Instant::now();
                let applied = self
                    .shared
                    .control
                    .apply_timed(selector, change, until)
                    .await?;
                let version = applied.version;
                let reached = self.push(selector, Push::Change);
                drop(applied);
                log_change(
                    selector,
                    change,
                    version,
                    until,
                    Some(reached.len()),
                    requester,
                );
                let targets = self
                    .acknowledgements(&reached, version, wait, Some(started))
                    .await;
                v1::UpdateControlResponse {
                    version,
                    targets,
                    unanswered_hubs: Vec::new(),
                    expires_at_ms: 0,
                }
            }
        };
        response.expires_at_ms = until.unwrap_or(0);
        Ok(response)
    }

    /// Reverts the timed settings due now, pushes the result to the workers of each level, and
    /// logs each one; in cluster mode, writes each due level back to the cluster's state, which
    /// every hub follows. Returns whether it must be tried again later (the disk or NATS
    /// failed, or a reverted level has yet to come back from the cluster).
    pub async fn revert_due(&self) -> bool {
        let now_ms = timed::now_ms();
        let control = &self.shared.control;
        let Some(link) = self.cluster() else {
            let (applied, reverted) = match control.revert_due(now_ms).await {
                Ok(Some(done)) => done,
                Ok(None) => return false,
                // The error is logged where the save failed.
                Err(_) => return true,
            };
            let version = applied.version;
            for (selector, _) in &reverted {
                self.push(selector, Push::Change);
            }
            drop(applied);
            for (selector, settings) in &reverted {
                log_reverted(selector, settings, version);
            }
            return false;
        };
        let mut again = false;
        for selector in control.due_levels(now_ms) {
            let written = match link.buckets() {
                Ok(buckets) => cluster::control::revert(&buckets.control, &selector, now_ms).await,
                Err(error) => Err(error),
            };
            match written {
                Ok(Some((version, settings))) => {
                    log_reverted(&selector, &settings, version);
                    // Followed like any change; wait for it so as not to revert it again.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                    again |= !link.applied(version, deadline).await;
                }
                // Another hub reverted it, or changed it since: its entry is on the way.
                Ok(None) => again = true,
                Err(error) => {
                    tracing::warn!(selector = %selector, %error, "timed control change not reverted yet; retrying");
                    again = true;
                }
            }
        }
        again
    }

    /// The default rate the workers `selector` addresses have now, from which a target starts.
    async fn current_rate(&self, selector: &Selector) -> bridge_proto::sampling::Rate {
        let control = &self.shared.control;
        let (worker, pool, labels) = match (self.levels_of(selector).await, selector) {
            (Ok(levels), _) => levels,
            // A worker the change found a moment ago and that has gone since: its own levels.
            (Err(_), Selector::Worker(id)) => (Some(id.as_str()), String::new(), BTreeMap::new()),
            (Err(_), _) => (None, String::new(), BTreeMap::new()),
        };
        control.effective(worker, &pool, &labels).default_rate
    }

    /// The worker, pool and labels whose levels apply to what `selector` addresses: a worker's
    /// own (from this hub, else from the hub it streams to; none when only its settings are
    /// known), a label level's labels, a pool, or nothing for every worker.
    async fn levels_of<'a>(
        &self,
        selector: &'a Selector,
    ) -> Result<(Option<&'a str>, String, BTreeMap<String, String>)> {
        Ok(match selector {
            Selector::All => (None, String::new(), BTreeMap::new()),
            Selector::Pool(pool) => (None, pool.clone(), BTreeMap::new()),
            Selector::Labels(set) => (None, String::new(), set.labels().clone()),
            Selector::Worker(id) => {
                let (pool, labels) = match self.shared.registry.get(id) {
                    Some(worker) => {
                        let details = worker.details();
                        (details.pool.clone(), details.labels.clone())
                    }
                    None => match self.list_workers(Some(selector)).await.workers.first() {
                        Some(worker) => (
                            worker.pool.clone(),
                            worker.labels.clone().into_iter().collect(),
                        ),
                        None if self.shared.control.has_worker_settings(id) => {
                            (String::new(), BTreeMap::new())
                        }
                        None => return Err(Error::UnknownWorker(id.clone())),
                    },
                };
                (Some(id.as_str()), pool, labels)
            }
        })
    }

    /// Sets the rate the controller chose for a level under a target (see `steering`) and
    /// pushes it to the level's workers; in cluster mode writes it to the cluster's state.
    /// Returns the new version; `None` when the level changed since the controller looked.
    pub async fn steer(
        &self,
        selector: &Selector,
        from: bridge_proto::sampling::Rate,
        to: bridge_proto::sampling::Rate,
    ) -> Result<Option<u64>> {
        if let Some(link) = self.cluster() {
            return cluster::control::steer(&link.buckets()?.control, selector, from, to).await;
        }
        let Some(applied) = self.shared.control.steer(selector, from, to).await? else {
            return Ok(None);
        };
        let version = applied.version;
        self.push(selector, Push::Change);
        drop(applied);
        Ok(Some(version))
    }

    /// Whether a worker with this id is connected to (or remembered by) any hub, or has
    /// settings of its own, so that it may be addressed.
    async fn knows_worker(&self, id: &str) -> bool {
        if self.shared.registry.get(id).is_some() || self.shared.control.has_worker_settings(id) {
            return true;
        }
        match self.cluster() {
            Some(link) => !link
                .remote_workers(Some(&Selector::Worker(id.to_owned())))
                .await
                .workers
                .is_empty(),
            None => false,
        }
    }

    /// Pushes the current desired state to this hub's workers that `selector` addresses;
    /// returns them.
    fn push(&self, selector: &Selector, how: Push) -> Vec<Arc<Worker>> {
        let reached = self.addressed(selector);
        // Most workers have no settings of their own and match no label level: their state
        // depends on their pool only, so it is computed once per pool rather than once per
        // worker.
        let mut by_pool: std::collections::HashMap<String, bridge_proto::control::ControlState> =
            std::collections::HashMap::new();
        for worker in &reached {
            let (pool, labels) = {
                let details = worker.details();
                (details.pool.clone(), details.labels.clone())
            };
            let control = &self.shared.control;
            let state =
                if control.has_worker_settings(&worker.id) || control.label_levels_apply(&labels) {
                    control.effective(Some(&worker.id), &pool, &labels)
                } else {
                    by_pool
                        .entry(pool)
                        .or_insert_with_key(|pool| control.effective(None, pool, &BTreeMap::new()))
                        .clone()
                };
            match how {
                Push::Change => {
                    worker.offer_desired(state);
                }
                Push::Reload => worker.reload_desired(state),
            }
        }
        reached
    }

    /// This hub's workers that `selector` addresses.
    fn addressed(&self, selector: &Selector) -> Vec<Arc<Worker>> {
        match selector {
            Selector::Worker(id) => self.shared.registry.get(id).into_iter().collect(),
            _ => self
                .shared
                .registry
                .unordered()
                .into_iter()
                .filter(|worker| selects(selector, worker))
                .collect(),
        }
    }

    /// Waits up to `wait` for this hub's workers that `selector` addresses to apply `version`
    /// of the cluster's state (which this hub pushes to them once it has it). Latencies count
    /// from this hub's push, which may have come before the question.
    pub async fn local_acknowledgements(
        &self,
        selector: &Selector,
        version: u64,
        wait: Duration,
    ) -> Vec<v1::TargetStatus> {
        let started = Instant::now();
        if let Some(link) = self.cluster() {
            // The change reaches this hub's copy through NATS; wait for it at least a moment
            // even when the command does not wait for acknowledgements.
            let deadline = tokio::time::Instant::now() + wait.max(rpc::ANSWER_MARGIN);
            link.applied(version, deadline).await;
        }
        let reached = self.addressed(selector);
        self.acknowledgements(
            &reached,
            version,
            wait.saturating_sub(started.elapsed()),
            None,
        )
        .await
    }

    /// Waits up to `wait` for the connected workers among `reached` that acknowledge control
    /// to apply `version`; their statuses, with latencies counted from `started`, or (`None`)
    /// from the moment the hub sent each worker its state.
    async fn acknowledgements(
        &self,
        reached: &[Arc<Worker>],
        version: u64,
        wait: Duration,
        started: Option<Instant>,
    ) -> Vec<v1::TargetStatus> {
        let deadline = tokio::time::Instant::now() + wait;
        let targets = reached
            .iter()
            .filter(|w| w.details().connected)
            .map(|worker| async move {
                let acknowledges = worker.details().acknowledges;
                let mut applied = worker.watch_applied();
                let acked = acknowledges
                    && !wait.is_zero()
                    && tokio::time::timeout_at(deadline, applied.wait_for(|v| *v >= version))
                        .await
                        .is_ok_and(|r| r.is_ok());
                let acked = acked || worker.applied_version().is_some_and(|v| v >= version);
                v1::TargetStatus {
                    worker_id: worker.id.clone(),
                    acknowledges,
                    applied: acked,
                    ack_latency_us: match (acked, started) {
                        (false, _) => 0,
                        (true, Some(started)) => {
                            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
                        }
                        (true, None) => worker.details().last_ack_latency.map_or(0, |latency| {
                            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)
                        }),
                    },
                }
            });
        join_all(targets).await
    }

    /// The workers the selector addresses (all when `None`) on every hub, as the admin API
    /// shows them. A worker that moved between hubs is shown where it is connected.
    /// Hubs that did not answer are named in the response.
    pub async fn list_workers(&self, selector: Option<&Selector>) -> v1::ListWorkersResponse {
        let mut workers = self.local_workers(selector);
        let Some(link) = self.cluster() else {
            return v1::ListWorkersResponse {
                workers,
                unanswered_hubs: Vec::new(),
            };
        };
        let remote = link.remote_workers(selector).await;
        workers.extend(remote.workers);
        // Connected first, then the most recently connected: the first of each id stays.
        workers.sort_by(|a, b| {
            (
                a.id.as_str(),
                !a.connected,
                std::cmp::Reverse(a.connected_since_ns),
            )
                .cmp(&(
                    b.id.as_str(),
                    !b.connected,
                    std::cmp::Reverse(b.connected_since_ns),
                ))
        });
        workers.dedup_by(|later, first| later.id == first.id);
        v1::ListWorkersResponse {
            workers,
            unanswered_hubs: remote.unanswered_hubs,
        }
    }

    /// The workers the selector addresses (all when `None`) that this hub knows.
    pub fn local_workers(&self, selector: Option<&Selector>) -> Vec<v1::WorkerInfo> {
        let hub = self.cluster().map_or("", |link| link.node());
        self.shared
            .registry
            .all()
            .iter()
            .filter(|w| selector.is_none_or(|s| selects(s, w)))
            .map(|w| worker_info(w, hub, &self.shared.control))
            .collect()
    }

    /// The effective control state for a selector and the levels it comes from.
    pub async fn describe_control(&self, selector: &Selector) -> Result<v1::GetControlResponse> {
        let (worker, pool, labels) = self.levels_of(selector).await?;
        Ok(self.shared.control.describe(worker, &pool, &labels))
    }

    /// Runs once-a-second housekeeping until shutdown.
    pub async fn run_ticker(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => return,
                _ = tick.tick() => self.shared.registry.tick_rates(),
            }
        }
    }
}

/// The log line every revert writes, one per setting.
fn log_reverted(selector: &Selector, settings: &[Reverted], version: u64) {
    for setting in settings {
        info!(
            selector = %selector,
            setting = %setting.setting,
            reverted_to = setting.to.as_deref().unwrap_or("inherited"),
            control.version = version,
            "timed control change reverted: {selector}: {setting}"
        );
    }
}

/// The log line every change writes, as soon as it is made (before any acknowledgement).
fn log_change(
    selector: &Selector,
    change: &Change,
    version: u64,
    until: Option<u64>,
    workers: Option<usize>,
    requester: Requester<'_>,
) {
    let expires_at = until.map(|ms| {
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
    });
    info!(
        selector = %selector,
        change = %change,
        expires_at = expires_at.map(tracing::field::display),
        control.version = version,
        workers,
        token = requester.token,
        via = requester.via,
        peer = requester.peer.map(tracing::field::display),
        "control changed"
    );
}

/// Whether `selector` addresses the worker `info` describes (from any hub).
pub(crate) fn selects_info(selector: &Selector, info: &v1::WorkerInfo) -> bool {
    match selector {
        Selector::All => true,
        Selector::Worker(id) => info.id == *id,
        Selector::Pool(pool) => info.pool == *pool,
        Selector::Labels(set) => set.matched_by(&info.labels.clone().into_iter().collect()),
    }
}

fn selects(selector: &Selector, worker: &Worker) -> bool {
    match selector {
        Selector::All => true,
        Selector::Worker(id) => worker.id == *id,
        Selector::Pool(pool) => worker.details().pool == *pool,
        Selector::Labels(set) => set.matched_by(&worker.details().labels),
    }
}

impl cluster::LocalHub for Hub {
    fn shutdown(&self) -> &CancellationToken {
        &self.shared.shutdown
    }

    fn announce_cluster(&self, node: &str, connected: bool) {
        Hub::announce_cluster(self, node, connected);
    }

    fn local_workers(&self, selector: Option<&Selector>) -> Vec<v1::WorkerInfo> {
        Hub::local_workers(self, selector)
    }

    async fn local_acknowledgements(
        &self,
        selector: &Selector,
        version: u64,
        wait: Duration,
    ) -> Vec<v1::TargetStatus> {
        Hub::local_acknowledgements(self, selector, version, wait).await
    }

    async fn load_cluster_state(
        &self,
        layers: Vec<(Selector, Layer)>,
        refused: &[Selector],
        epoch: u64,
    ) {
        Hub::load_cluster_state(self, layers, refused, epoch).await;
    }

    async fn apply_cluster_layer(&self, selector: &Selector, layer: Layer) {
        Hub::apply_cluster_layer(self, selector, layer).await;
    }
}

fn worker_info(worker: &Worker, hub: &str, control: &ControlPlane) -> v1::WorkerInfo {
    let desired = worker.desired();
    let (pool, labels) = {
        let details = worker.details();
        (details.pool.clone(), details.labels.clone())
    };
    let expires_at = control.next_expiry_in_force(Some(&worker.id), &pool, &labels);
    let events_per_second = worker.events_per_second();
    let applied_version = worker.applied_version();
    let status = worker.details();
    v1::WorkerInfo {
        id: worker.id.clone(),
        pool: status.pool.clone(),
        connected: status.connected,
        connected_since_ns: unix_nanos(status.connected_since),
        disconnected_ns: status.disconnected_at.map_or(0, unix_nanos),
        pid: status.pid,
        peer: status.peer.clone(),
        labels: status.labels.clone().into_iter().collect(),
        events_received: worker.counters.received.load(Relaxed),
        events_delivered: worker.counters.delivered.load(Relaxed),
        events_per_second,
        hub_drops: worker
            .counters
            .drops()
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| (reason.as_str().to_owned(), n))
            .collect(),
        worker_counters: status.reported.clone().into_iter().collect(),
        desired_version: desired.version,
        applied_version,
        acknowledges: status.acknowledges,
        control: Some(v1::ControlState::from(&*desired)),
        last_ack_latency_us: status
            .last_ack_latency
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        gpu: status.gpu.clone(),
        missing_events: worker.counters.missing.load(Relaxed),
        last_sequence: worker.counters.last_sequence.load(Relaxed),
        hub: hub.to_owned(),
        control_expires_in_ms: expires_at.map_or(0, |at| at.saturating_sub(timed::now_ms()).max(1)),
        target_events_per_second: control
            .target_for(Some(&worker.id), &pool, &labels)
            .map(EventRate::get),
    }
}

impl WorkerDirectory for Hub {
    fn describe(&self, worker_id: &str) -> WorkerDescription {
        self.registry()
            .get(worker_id)
            .map(|worker| {
                let details = worker.details();
                WorkerDescription {
                    labels: details.labels.clone(),
                    host: details.host.clone(),
                }
            })
            .unwrap_or_default()
    }
}
