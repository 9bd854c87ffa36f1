//! Serving a hub on a bound listener: the bridge service, health and reflection on one port.

use std::{future::Future, time::Duration};

use bridge_proto::{
    FILE_DESCRIPTOR_SET, SERVICE_NAME, server::telemetry_bridge_server::TelemetryBridgeServer,
};
use tokio::net::TcpListener;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{hub::Hub, service::BridgeService};

/// Serves `hub` on `listener` until `shutdown` completes, then ends every stream with
/// UNAVAILABLE and waits up to the configured grace period for connections to close.
pub async fn serve(
    hub: Hub,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = hub.config().hub.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let bridge = TelemetryBridgeServer::new(BridgeService::new(hub.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let keepalive = (config.keepalive_secs > 0).then(|| Duration::from_secs(config.keepalive_secs));

    tokio::spawn(hub.clone().run_ticker());
    let drained = hub.shutdown_token().clone();
    let hub_for_shutdown = hub.clone();
    let signal = async move {
        shutdown.await;
        info!("shutting down: ending worker streams and subscriptions");
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
        hub_for_shutdown.shut_down();
    };
    let server = Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(config.stream_window_bytes)
        .initial_connection_window_size(config.connection_window_bytes)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive.map(|k| k.min(Duration::from_secs(20))))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(bridge)
        // tonic applies `tcp_nodelay` only to listeners it binds itself; without it, small
        // writes wait for delayed acknowledgements (40 ms stalls).
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal);

    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async {
            drained.cancelled().await;
            tokio::time::sleep(config.shutdown_grace()).await;
        } => {
            warn!(grace_ms = config.shutdown_grace_ms, "connections still open after the grace period; exiting anyway");
        }
    }
    Ok(())
}
