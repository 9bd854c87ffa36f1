//! The benchmark's baseline: the least a gRPC server with the same contract and the same
//! HTTP/2 settings can do. It counts events (ingest), forwards each event encoded once to every
//! subscriber whose name filter matches, through the same bounded queues (fan-out, latency),
//! answers a unary call (control round trip) and holds idle streams (memory). Every figure of
//! the hub is reported as a ratio to this.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use arc_swap::ArcSwap;
use async_stream::stream;
use bridge::Config;
use bridge_proto::{
    encoded::EncodedSubscribeResponse,
    server::telemetry_bridge_server::{TelemetryBridge, TelemetryBridgeServer},
    v1,
    view::EventView,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming, transport::Server};
use worker::emitter::now_ns;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Debug)]
struct Subscriber {
    /// Event names it wants; `None`: all.
    names: Option<HashSet<String>>,
    queue: mpsc::Sender<EncodedSubscribeResponse>,
    skipped: AtomicU64,
}

#[derive(Debug, Default)]
struct Shared {
    received: AtomicU64,
    subscribers: ArcSwap<Vec<Arc<Subscriber>>>,
    edit: Mutex<()>,
}

#[derive(Debug, Clone, Default)]
struct Baseline {
    shared: Arc<Shared>,
}

impl Baseline {
    fn forward(&self, event: &EventView) {
        let subscribers = self.shared.subscribers.load();
        if subscribers.is_empty() {
            return;
        }
        let name = event.name();
        let mut encoded = None;
        for subscriber in subscribers.iter() {
            if subscriber
                .names
                .as_ref()
                .is_some_and(|n| !n.contains(&name))
            {
                continue;
            }
            let response = encoded.get_or_insert_with(|| {
                EncodedSubscribeResponse::delivery_of_bytes(
                    "bench",
                    "",
                    event.as_bytes(),
                    None,
                    1.0,
                    now_ns(),
                )
            });
            if subscriber.queue.try_send(response.clone()).is_err() {
                subscriber.skipped.fetch_add(1, Relaxed);
            }
        }
    }
}

#[tonic::async_trait]
impl TelemetryBridge for Baseline {
    type StreamTelemetryStream = BoxStream<v1::TelemetryControl>;
    type SubscribeStream = BoxStream<EncodedSubscribeResponse>;

    async fn stream_telemetry(
        &self,
        request: Request<Streaming<EventView>>,
    ) -> Result<Response<Self::StreamTelemetryStream>, Status> {
        let mut inbound = request.into_inner();
        let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(event)) = inbound.message().await {
                this.shared.received.fetch_add(1, Relaxed);
                this.forward(&event);
            }
            let _ = done_tx.send(());
        });
        Ok(Response::new(Box::pin(stream! {
            yield Ok(v1::TelemetryControl {
                control: Some(v1::telemetry_control::Control::State(v1::ControlState {
                    version: 1,
                    enabled: true,
                    sampling_rate: 1.0,
                    ..Default::default()
                })),
            });
            let _ = (&mut done).await;
        })))
    }

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let patterns = request.into_inner().patterns;
        let names = (!patterns.is_empty() && !patterns.iter().any(|p| p == ">"))
            .then(|| patterns.into_iter().collect());
        let (tx, mut rx) = mpsc::channel(Config::default().hub.subscriber_queue);
        let subscriber = Arc::new(Subscriber {
            names,
            queue: tx,
            skipped: AtomicU64::new(0),
        });
        {
            let _edit = self.shared.edit.lock().unwrap_or_else(|p| p.into_inner());
            let mut list = Vec::clone(&self.shared.subscribers.load());
            list.push(subscriber.clone());
            self.shared.subscribers.store(Arc::new(list));
        }
        Ok(Response::new(Box::pin(stream! {
            while let Some(response) = rx.recv().await {
                let skipped = subscriber.skipped.swap(0, Relaxed);
                if skipped > 0 {
                    yield Ok(EncodedSubscribeResponse::lagged(skipped));
                }
                yield Ok(response);
            }
        })))
    }

    async fn list_workers(
        &self,
        _: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        Ok(Response::new(v1::ListWorkersResponse::default()))
    }

    async fn update_control(
        &self,
        _: Request<v1::UpdateControlRequest>,
    ) -> Result<Response<v1::UpdateControlResponse>, Status> {
        Ok(Response::new(v1::UpdateControlResponse::default()))
    }

    async fn get_control(
        &self,
        _: Request<v1::GetControlRequest>,
    ) -> Result<Response<v1::GetControlResponse>, Status> {
        Ok(Response::new(v1::GetControlResponse::default()))
    }
}

/// Serves the baseline on `listener` with the hub's default HTTP/2 settings, forever.
pub async fn serve(listener: TcpListener) -> Result<(), String> {
    let config = Config::default().hub;
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(config.stream_window_bytes)
        .initial_connection_window_size(config.connection_window_bytes)
        .add_service(
            TelemetryBridgeServer::new(Baseline::default())
                .max_decoding_message_size(config.max_message_bytes),
        )
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await
        .map_err(|e| e.to_string())
}
