//! Cluster mode: several hubs act as one through NATS.
//!
//! - [`events`]: every hub publishes the events it passes on; subscribers on any hub receive
//!   the events of workers on every hub.
//! - [`control`]: desired control state lives in a JetStream key-value bucket that no hub owns;
//!   every hub follows it and pushes changes to its own workers.
//! - [`rpc`]: a hub asks the others for their workers and for their workers'
//!   acknowledgements, so commands against any hub reach workers on every hub.
//!
//! A hub whose NATS connection is down keeps serving its own workers and subscribers with the
//! last state it saw, and says so on `/readyz`.

pub mod control;
pub mod events;
pub mod rpc;
mod token;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Instant,
};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

pub use self::events::{Outbound, parse_token, subject_token};
use crate::config::ClusterConfig;

/// This hub's link to the cluster.
#[derive(Debug)]
pub struct ClusterLink {
    client: async_nats::Client,
    node: Arc<str>,
    prefix: String,
    /// JetStream replicas of the buckets.
    replicas: usize,
    outbound: mpsc::Sender<Outbound>,
    /// Whether the NATS connection is up, as its events said last.
    connection: watch::Receiver<bool>,
    /// The key-value buckets, once JetStream answered.
    buckets: watch::Sender<Option<control::Buckets>>,
    /// The newest revision of the control bucket this hub has applied (0: not loaded yet).
    applied_revision: watch::Sender<u64>,
    /// Local subscribers by the NATS subject they receive other hubs' events on.
    mirrors: Mutex<HashMap<String, Arc<events::Mirror>>>,
    /// Hubs that are up, and when this hub last heard that they were.
    members: Mutex<HashMap<String, Instant>>,
    /// Events that found the backlog full (NATS slow or away).
    pub dropped: AtomicU64,
    /// Events received from other hubs.
    pub received: AtomicU64,
}

/// Starts following the cluster's control state and answering the other hubs.
pub(crate) fn start(hub: crate::Hub, link: Arc<ClusterLink>) {
    tokio::spawn(control::follow(hub.clone(), link.clone()));
    tokio::spawn(rpc::serve(hub.clone(), link.clone()));
    tokio::spawn(announce(hub, link));
}

/// Publishes `bridge.cluster.connected` / `disconnected` as the NATS connection comes and goes,
/// so that a subscriber knows when events from other hubs may be missing. (NATS delivers at
/// most once; what other hubs published while this one was cut off is not replayed.)
async fn announce(hub: crate::Hub, link: Arc<ClusterLink>) {
    let mut connection = link.connection.clone();
    let mut announced = false;
    loop {
        tokio::select! {
            () = hub.shutdown_token().cancelled() => return,
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
    /// and starts publishing.
    pub async fn connect(config: &ClusterConfig, node: String) -> Result<Arc<Self>, String> {
        let url = config.nats_url.trim();
        let (connection_tx, connection) = watch::channel(false);
        let client = async_nats::ConnectOptions::new()
            .name(format!("telemetry-bridge {node}"))
            .retry_on_initial_connect()
            // A hub's own events reach its subscribers directly; back from NATS they would be
            // duplicates, and every one of them would cross the network twice.
            .no_echo()
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
            outbound,
            buckets: watch::Sender::new(None),
            applied_revision: watch::Sender::new(0),
            members: Mutex::default(),
            mirrors: Mutex::default(),
            dropped: AtomicU64::new(0),
            received: AtomicU64::new(0),
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
