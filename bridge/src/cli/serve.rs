//! `bridge serve`: run a hub until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::PathBuf};

use bridge::{Config, Hub, cluster::ClusterLink};
use tokio::net::TcpListener;

use super::{Failure, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file (built-in defaults when omitted).
    #[arg(long, env = "BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:50051 (overrides hub.listen). Port 0 picks a free one.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for the control state file (overrides hub.state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve on a non-loopback address without tokens: anyone who can reach it may read all
    /// telemetry and change every worker's control.
    #[arg(long)]
    insecure: bool,
    /// Address of the HTTP port (/metrics, /healthz, /readyz, the JSON API under /api), or `off`
    /// (overrides hub.http).
    #[arg(long, value_name = "ADDR|off")]
    http: Option<String>,
}

pub async fn run(args: Args) -> Outcome {
    let mut config = Config::load(args.config.as_deref()).map_err(Failure::invalid)?;
    if let Some(listen) = args.listen {
        config.hub.listen = listen;
    }
    if let Some(dir) = args.state_dir {
        config.hub.state_dir = dir;
    }
    if let Some(http) = args.http {
        config.hub.http = http;
    }
    let http = config
        .hub
        .http_address()
        .map_err(|e| Failure::invalid(format!("--http: {e}")))?;
    let listen = config.hub.listen;
    let hub = Hub::new(config).map_err(|e| {
        let code = if matches!(e, bridge::Error::InvalidArgument(_)) {
            2
        } else {
            1
        };
        Failure::new(code, e)
    })?;
    let exposed = std::iter::once(listen)
        .chain(http)
        .find(|address| !address.ip().is_loopback());
    if let Some(exposed) = exposed
        && !hub.auth().enabled()
    {
        if !args.insecure {
            return Err(Failure::invalid(format!(
                "refusing to serve {exposed} without tokens: anyone who can reach it could read all telemetry and steer every worker. Configure [[auth.tokens]], listen on loopback, or pass --insecure"
            )));
        }
        tracing::warn!(%exposed, "serving without tokens on a non-loopback address (--insecure): anyone who can reach it may read telemetry and change control");
    }
    raise_descriptor_limit(hub.config().limits.max_connections);
    // Everything that can fail is done before the addresses are printed, so that a script or a
    // person never sees `listening on` from a hub that is about to exit.
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::new(1, format!("cannot listen on {listen}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure::new(1, format!("cannot read the bound address: {e}")))?;
    let http_listener = match http {
        None => None,
        Some(http) => Some(TcpListener::bind(http).await.map_err(|e| {
            Failure::new(
                1,
                format!("cannot listen on {http} for HTTP: {e} (--http ADDR to move it, --http off to disable)"),
            )
        })?),
    };
    let cluster = &hub.config().cluster;
    if cluster.enabled() {
        let node = if cluster.node.trim().is_empty() {
            format!("{}:{}", bridge_proto::connect::host_name(), bound.port())
        } else {
            cluster.node.trim().to_owned()
        };
        let link = ClusterLink::connect(cluster, node, hub.outputs().clone())
            .await
            .map_err(Failure::invalid)?;
        tracing::info!(node = link.node(), nats = %cluster.nats_url, "cluster mode: sharing events through NATS");
        hub.join_cluster(link);
    }
    hub.start_export().map_err(Failure::invalid)?;
    // The first line on stdout names the bound address, so scripts and tests that asked for
    // port 0 can find it.
    println!("listening on {bound}");
    let scheme = if hub.tls().is_some() { "https" } else { "http" };
    tracing::info!(%bound, tls = hub.tls().is_some(), "hub listening");
    if let Some(http_listener) = http_listener {
        let bound = http_listener
            .local_addr()
            .map_err(|e| Failure::new(1, format!("cannot read the bound address: {e}")))?;
        // The second line names the HTTP port, for the same reason.
        println!("http on {bound}");
        tracing::info!(url = %format!("{scheme}://{bound}"), "http listening (/metrics, /healthz, /readyz, /api)");
        let stopped = hub.shutdown_token().clone().cancelled_owned();
        let http_hub = hub.clone();
        tokio::spawn(async move {
            if let Err(error) = bridge::http::serve(http_hub, http_listener, stopped).await {
                tracing::warn!(%error, "http port failed");
            }
        });
    }
    bridge::serve(hub, listener, shutdown_signal()).await?;
    Ok(())
}

/// Raises the soft limit on open files to the hard one, and warns when even that leaves too few
/// for `max_connections` on each port.
fn raise_descriptor_limit(max_connections: usize) {
    // Both ports, plus the state file, NATS, OTLP and the runtime's own.
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
        .saturating_add(bridge::listener::RESERVED_DESCRIPTORS);
    match bridge::listener::raise_descriptor_limit() {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-file limit ({limit}) is below what limits.max_connections needs ({needed}: two ports and some to spare); connections past it will fail. Raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower limits.max_connections"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot read or raise the open-file limit"),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
