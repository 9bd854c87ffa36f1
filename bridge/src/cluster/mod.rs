//! Cluster mode: several hubs act as one through NATS.
//!
//! - [`events`]: every hub publishes the events it passes on, in batches; subscribers on any
//!   hub receive the events of workers on every hub.
//! - [`control`]: desired control state lives in a JetStream key-value bucket that no hub owns;
//!   every hub follows it and pushes changes to its own workers.
//! - [`rpc`]: a hub asks the others for their workers and for their workers'
//!   acknowledgements, so commands against any hub reach workers on every hub.
//!
//! A hub whose NATS connection is down keeps serving its own workers and subscribers with the
//! last state it saw, and says so on `/readyz`.
//!
//! The cluster sees its hub through [`LocalHub`] (its own workers and control state) and
//! [`Outputs`] (where other hubs' events go), never the rest of it.

pub mod control;
pub mod events;
pub mod rpc;
mod token;

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bridge_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use self::events::{Counters, Outbound, subject_token};
use crate::{command::Selector, config::ClusterConfig, control::layer::Layer, outputs::Outputs};

/// What the cluster needs of the hub it links: its own workers and its copy of the control
/// state. The hub implements it.
pub trait LocalHub: Clone + Send + Sync + 'static {
    /// Cancelled when the hub shuts down.
    fn shutdown(&self) -> &CancellationToken;
    /// Tells the hub's subscribers that its NATS connection came up or went down.
    fn announce_cluster(&self, node: &str, connected: bool);
    /// The hub's own workers that `selector` addresses (all when `None`).
    fn local_workers(&self, selector: Option<&Selector>) -> Vec<v1::WorkerInfo>;
    /// Waits up to `wait` for the hub's own workers that `selector` addresses to apply
    /// `version` of the cluster's state.
    fn local_acknowledgements(
        &self,
        selector: &Selector,
        version: u64,
        wait: Duration,
    ) -> impl Future<Output = Vec<v1::TargetStatus>> + Send;
    /// Takes the cluster's control state, just loaded; `refused` levels did not validate.
    fn load_cluster_state(
        &self,
        layers: Vec<(Selector, Layer)>,
        refused: &[Selector],
        epoch: u64,
    ) -> impl Future<Output = ()> + Send;
    /// Takes one level of the cluster's control state that changed.
    fn apply_cluster_layer(
        &self,
        selector: &Selector,
        layer: Layer,
    ) -> impl Future<Output = ()> + Send;
}

/// This hub's link to the cluster.
#[derive(Debug)]
pub struct ClusterLink {
    client: async_nats::Client,
    node: Arc<str>,
    prefix: String,
    /// JetStream replicas of the buckets.
    replicas: usize,
    /// How long the publisher gathers events after a batch (`ClusterConfig::linger`).
    linger: Duration,
    outbound: mpsc::Sender<Outbound>,
    /// Whether the NATS connection is up, as its events said last.
    connection: watch::Receiver<bool>,
    /// The key-value buckets, once JetStream answered.
    buckets: watch::Sender<Option<control::Buckets>>,
    /// The newest revision of the control bucket this hub has applied (0: not loaded yet).
    applied_revision: watch::Sender<u64>,
    /// This hub's open subscriptions: while there is one, it receives other hubs' events.
    listeners: watch::Sender<usize>,
    /// Hubs that are up, and when this hub last heard that they were.
    members: Mutex<HashMap<String, Instant>>,
    /// Events and batches sent, received, dropped and refused.
    pub counters: Counters,
    /// Where events from other hubs go.
    outputs: Outputs,
}

/// Starts following the cluster's control state and answering the other hubs.
pub(crate) fn start(hub: impl LocalHub, link: Arc<ClusterLink>) {
    tokio::spawn(control::follow(hub.clone(), link.clone()));
    tokio::spawn(rpc::serve(hub.clone(), link.clone()));
    tokio::spawn(events::receive(link.clone(), hub.shutdown().clone()));
    tokio::spawn(announce(hub, link));
}

/// Publishes `bridge.cluster.connected` / `disconnected` as the NATS connection comes and goes,
/// so that a subscriber knows when events from other hubs may be missing. (NATS delivers at
/// most once; what other hubs published while this one was cut off is not replayed.)
async fn announce(hub: impl LocalHub, link: Arc<ClusterLink>) {
    let mut connection = link.connection.clone();
    let mut announced = false;
    loop {
        tokio::select! {
            () = hub.shutdown().cancelled() => return,
            changed = connection.changed() => {
                if changed.is_err() {
                    return;
                }
                let connected = *connection.borrow_and_update();
                if connected != announced {
                    hub.announce_cluster(link.node(), connected);
                    announced = connected;
                }
            }
        }
    }
}

impl ClusterLink {
    /// Connects (in the background: a hub whose NATS is down still starts and serves locally)
    /// and starts publishing; events from other hubs go to `outputs`.
    pub async fn connect(
        config: &ClusterConfig,
        node: String,
        outputs: Outputs,
    ) -> Result<Arc<Self>, String> {
        let url = config.nats_url.trim();
        let (connection_tx, connection) = watch::channel(false);
        let client = async_nats::ConnectOptions::new()
            .name(format!("telemetry-bridge {node}"))
            .retry_on_initial_connect()
            // A hub's own events reach its subscribers directly; back from NATS they would be
            // duplicates, and every one of them would cross the network twice.
            .no_echo()
            // Messages are batches of up to 64 KiB: these bound what waits in the client
            // (to publish while NATS is away, or for this hub to take) to 16 and 64 MiB.
            .client_capacity(256)
            .subscription_capacity(1024)
            .event_callback(move |event| {
                let connection_tx = connection_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            info!("cluster: connected to NATS");
                            connection_tx.send_replace(true);
                        }
                        async_nats::Event::Disconnected => {
                            connection_tx.send_replace(false);
                            warn!(
                                "cluster: NATS connection lost; serving local workers and subscribers only"
                            );
                        }
                        other => debug!(%other, "cluster: NATS event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| format!("cluster.nats_url `{url}`: {e}"))?;
        let (outbound, backlog) = mpsc::channel(events::BACKLOG);
        let link = Arc::new(Self {
            client,
            node: node.into(),
            connection,
            prefix: config.subject_prefix.clone(),
            replicas: config.replicas,
            linger: config.linger(),
            outbound,
            buckets: watch::Sender::new(None),
            applied_revision: watch::Sender::new(0),
            members: Mutex::default(),
            listeners: watch::Sender::new(0),
            counters: Counters::default(),
            outputs,
        });
        tokio::spawn(events::publish(link.clone(), backlog));
        Ok(link)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the NATS connection is up now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether this hub has loaded the cluster's control state and follows it.
    pub fn following(&self) -> bool {
        *self.applied_revision.borrow() > 0
    }

    /// A subject under this cluster's prefix.
    fn scoped(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }
}
