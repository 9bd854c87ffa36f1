//! Serving a hub on a bound listener: the bridge service, health and reflection on one port.

use std::{future::Future, pin::Pin, time::Duration};

use bridge_proto::{
    FILE_DESCRIPTOR_SET, SERVICE_NAME, server::telemetry_bridge_server::TelemetryBridgeServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::Router};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{connection_threads, hub::Hub, listener, service::BridgeService};

/// Serves `hub` on `listener` until `shutdown` completes, then ends every stream with
/// UNAVAILABLE and waits up to the configured grace period for connections to close.
pub async fn serve(
    hub: Hub,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = hub
        .tls()
        .map(|tls| tls.grpc(hub.config().limits.handshake_timeout()));
    let limits = hub.config().limits.clone();
    let config = hub.config().hub.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1alpha too: older grpcurl releases and Postman speak only that version.
    let (reflection_v1, reflection_v1alpha) =
        (reflection().build_v1()?, reflection().build_v1alpha()?);
    let bridge = TelemetryBridgeServer::new(BridgeService::new(hub.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let keepalive = (config.keepalive_secs > 0).then(|| Duration::from_secs(config.keepalive_secs));

    tokio::spawn(hub.clone().run_ticker());
    tokio::spawn(crate::reverts::run(hub.clone()));
    tokio::spawn(crate::steering::run(hub.clone()));
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
    let router = || -> anyhow::Result<Router> {
        let mut builder = Server::builder();
        if let Some(tls) = tls.clone() {
            builder = builder.tls_config(tls)?;
        }
        Ok(builder
            .tcp_nodelay(true)
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .initial_stream_window_size(config.stream_window_bytes)
            .initial_connection_window_size(config.connection_window_bytes)
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(keepalive.map(|k| k.min(Duration::from_secs(20))))
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(bridge.clone()))
    };
    let incoming = listener::incoming(listener, limits.handshake_timeout(), limits.max_connections);
    let abandon = CancellationToken::new();
    let server: Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> =
        match config.connection_threads {
            0 => {
                let served = router()?.serve_with_incoming_shutdown(incoming, signal);
                Box::pin(async move { Ok(served.await?) })
            }
            _ => {
                tokio::spawn(signal);
                let (load, stop, abandon) = (
                    hub.connection_load().clone(),
                    hub.shutdown_token().clone(),
                    abandon.clone(),
                );
                Box::pin(async move {
                    connection_threads::serve(&load, router, incoming, stop, abandon).await
                })
            }
        };
    tokio::select! {
        result = server => result?,
        () = async {
            drained.cancelled().await;
            tokio::time::sleep(config.shutdown_grace()).await;
        } => {
            abandon.cancel();
            warn!(grace_ms = config.shutdown_grace_ms, "connections still open after the grace period; exiting anyway");
        }
    }
    // Every change was written before it was confirmed; this makes the last ones durable
    // against a power loss too, instead of leaving them to the background flush.
    hub.flush_state()?;
    info!("control state flushed; hub stopped");
    Ok(())
}
