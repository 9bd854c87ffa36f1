//! The sidecar's local endpoint: the same `StreamTelemetry` contract the hub serves, on loopback
//! TCP or a unix socket, so an app with its own gRPC client sends its events through the sidecar
//! (which numbers, buffers and replays them under its own worker id).
//!
//! Over a unix socket, grpcio (Python, C++) sends the percent-encoded socket path as
//! `:authority`, which the HTTP/2 implementation rejects as malformed (hyperium/h2#487); such
//! clients set the channel option `grpc.default_authority` to `localhost`, or use loopback TCP.
//!
//! Local clients receive the sidecar's control state the way the hub sends it: whole, to clients
//! that declare `x-bridge-control-ack: 1`, and as toggle, filter and one sampling rate (the
//! state's ceiling) to plain clients. Events of a client that acknowledged the current state are
//! taken as decided; everything else gets the sidecar's toggle, filters and sampling, the second
//! draw taking a plain client's own into account (as the hub does).

use std::{
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use async_stream::stream;
use bridge_proto::{
    encoded::EncodedSubscribeResponse,
    limits::EventLimits,
    protocol::{events, headers},
    sampling::Draw,
    server::telemetry_bridge_server::{TelemetryBridge, TelemetryBridgeServer},
    v1::{self, telemetry_value::Value},
    view::EventView,
};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, transport::Server};
use tracing::{debug, info, warn};

use crate::{counters::DropReason, emitter::Emitter};

/// Where the local endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddress {
    /// A loopback address, e.g. `127.0.0.1:50052`.
    Tcp(SocketAddr),
    /// A unix socket path, e.g. `/run/bridge/worker.sock`.
    Unix(PathBuf),
}

impl std::str::FromStr for LocalAddress {
    type Err = String;

    /// A path (anything with a `/`) is a unix socket; otherwise a loopback `HOST:PORT`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.contains('/') {
            return Ok(Self::Unix(PathBuf::from(
                text.strip_prefix("unix:").unwrap_or(text),
            )));
        }
        let address: SocketAddr = text.parse().map_err(|_| {
            format!("`{text}` is neither a socket path nor an address like 127.0.0.1:50052")
        })?;
        if !address.ip().is_loopback() {
            return Err(format!(
                "`{text}` is not a loopback address; the local endpoint has no authentication, so it only listens on 127.0.0.1, ::1 or a unix socket"
            ));
        }
        Ok(Self::Tcp(address))
    }
}

impl std::fmt::Display for LocalAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(address) => write!(f, "{address}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Relays local clients' events into the sidecar's emitter.
#[derive(Debug, Clone)]
struct LocalIngest {
    emitter: Emitter,
    shutdown: CancellationToken,
}

const ONLY_STREAMING: &str = "the sidecar's local endpoint accepts StreamTelemetry only; subscribe and administer at the hub";

#[tonic::async_trait]
impl TelemetryBridge for LocalIngest {
    type StreamTelemetryStream = BoxStream<v1::TelemetryControl>;
    type SubscribeStream = BoxStream<EncodedSubscribeResponse>;

    async fn stream_telemetry(
        &self,
        request: Request<Streaming<EventView>>,
    ) -> Result<Response<Self::StreamTelemetryStream>, Status> {
        let acknowledges = request
            .metadata()
            .get(headers::CONTROL_ACK)
            .is_some_and(|v| v == headers::CONTROL_ACK_YES);
        let mut inbound = request.into_inner();
        let applied = Arc::new(AtomicU64::new(0));
        let done = self.shutdown.child_token();
        // Why the sidecar ended the stream, when it did, for the client to read in the status.
        let failure: Arc<Mutex<Option<Status>>> = Arc::default();
        // The highest sequence number taken from this client: confirmed to it, as the hub
        // confirms, so that a client with an outage buffer (the worker library, the Python
        // SDK) can forget what the sidecar now holds in its own.
        let (receipts, mut received) = tokio::sync::watch::channel(0u64);
        {
            let (emitter, applied, done) = (self.emitter.clone(), applied.clone(), done.clone());
            let failure = failure.clone();
            tokio::spawn(async move {
                debug!(acknowledges, "local client connected");
                let mut warned = false;
                loop {
                    let message = tokio::select! {
                        () = done.cancelled() => break,
                        message = inbound.message() => message,
                    };
                    match message {
                        Ok(Some(event)) => match event.to_event() {
                            Ok(event) => {
                                let sequence = event.sequence;
                                relay(&emitter, &applied, acknowledges, event);
                                if sequence > *receipts.borrow() {
                                    receipts.send_replace(sequence);
                                }
                            }
                            Err(error) => {
                                emitter.count_parse_error();
                                if !std::mem::replace(&mut warned, true) {
                                    warn!(%error, "dropping malformed events from a local client (counted as dropped.parse_error; logged once per stream)");
                                }
                            }
                        },
                        Ok(None) => break,
                        Err(status) => {
                            if let Some(status) = refused(&emitter, status) {
                                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                            }
                            break;
                        }
                    }
                }
                debug!("local client disconnected");
                done.cancel();
            });
        }
        let mut control = self.emitter.watch_control();
        let mut limits = self.emitter.watch_limits();
        let outbound = stream! {
            loop {
                // Acknowledging clients get the hub's limits first, as the hub sends them.
                if acknowledges {
                    let announced = announced_limits(*limits.borrow_and_update());
                    yield Ok(v1::TelemetryControl {
                        control: Some(v1::telemetry_control::Control::Limits(announced.into())),
                    });
                }
                let state = control.borrow_and_update().clone();
                for message in state.messages(acknowledges) {
                    yield Ok(message);
                }
                loop {
                    // `done` first: the receipts' sender is gone once the client's half ended,
                    // and that must not end the stream before it says why.
                    tokio::select! {
                        biased;
                        () = done.cancelled() => {
                            let status = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
                            if let Some(status) = status {
                                yield Err(status);
                            }
                            return;
                        }
                        changed = control.changed() => if changed.is_err() { return } else { break },
                        changed = limits.changed(), if acknowledges => if changed.is_err() { return } else { break },
                        changed = received.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            let through_sequence = *received.borrow_and_update();
                            yield Ok(v1::TelemetryControl {
                                control: Some(v1::telemetry_control::Control::Received(
                                    v1::ReceiptAck { through_sequence },
                                )),
                            });
                        }
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn subscribe(
        &self,
        _: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented(ONLY_STREAMING))
    }

    async fn list_workers(
        &self,
        _: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        Err(Status::unimplemented(ONLY_STREAMING))
    }

    async fn update_control(
        &self,
        _: Request<v1::UpdateControlRequest>,
    ) -> Result<Response<v1::UpdateControlResponse>, Status> {
        Err(Status::unimplemented(ONLY_STREAMING))
    }

    async fn get_control(
        &self,
        _: Request<v1::GetControlRequest>,
    ) -> Result<Response<v1::GetControlResponse>, Status> {
        Err(Status::unimplemented(ONLY_STREAMING))
    }
}

/// The largest message the local endpoint reads; the limits it announces are held to it.
const MAX_LOCAL_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

fn announced_limits(limits: EventLimits) -> EventLimits {
    EventLimits {
        max_message_bytes: limits.max_message_bytes.min(MAX_LOCAL_MESSAGE_BYTES),
        ..limits
    }
}

/// What a failed local stream tells its client, counted and logged when it is the client's
/// fault: a message that does not decode (INVALID_ARGUMENT, `dropped.parse_error`) or one over
/// the size the endpoint reads (RESOURCE_EXHAUSTED, `dropped.over_limit`). `None` when the
/// client went away, which ends its stream and is nobody's fault.
fn refused(emitter: &Emitter, status: Status) -> Option<Status> {
    let status = match status.code() {
        tonic::Code::InvalidArgument => {
            emitter.count_parse_error();
            status
        }
        tonic::Code::OutOfRange if status.message().contains("too large") => {
            emitter.shared.counters.dropped(DropReason::OverLimit);
            Status::resource_exhausted(format!(
                "event message too large for the sidecar's local endpoint (at most {MAX_LOCAL_MESSAGE_BYTES} bytes): {}",
                status.message()
            ))
        }
        code => {
            debug!(
                ?code,
                message = status.message(),
                "local client stream failed"
            );
            return None;
        }
    };
    warn!(code = ?status.code(), message = status.message(), "ending a local client's stream: it sent a message the sidecar cannot take (counted)");
    Some(status)
}

/// One event from a local client: an acknowledgement, a counter report (ignored: the sidecar
/// reports its own), or telemetry to relay.
fn relay(emitter: &Emitter, applied: &AtomicU64, acknowledges: bool, event: v1::TelemetryEvent) {
    if event.event_parts == events::CONTROL_APPLIED {
        if let Some(Some(Value::IntValue(version))) = event
            .measurements
            .get(events::CONTROL_APPLIED_VERSION)
            .map(|v| v.value.clone())
        {
            applied.store(u64::try_from(version).unwrap_or(0), Relaxed);
        }
    } else if event.event_parts == events::WORKER_STATS {
        // The sidecar reports its own counters.
    } else if acknowledges && applied.load(Relaxed) == emitter.control().version {
        emitter.emit_decided(event);
    } else if acknowledges {
        emitter.emit_event(event, Draw::Consistent);
    } else {
        let mut event = event;
        if event.sampling_rate == 0.0 {
            // It sampled at the rate it was sent, unless it says otherwise.
            event.sampling_rate = emitter.control().ceiling().get();
        }
        emitter.emit_event(event, Draw::Independent);
    }
}

/// The local endpoint's listening socket, bound by [`bind`].
#[derive(Debug)]
pub enum LocalListener {
    Tcp(tokio::net::TcpListener, LocalAddress),
    Unix(tokio::net::UnixListener, PathBuf),
}

/// Binds the local endpoint's address.
///
/// A unix socket file already at the path is taken over only when nothing answers on it (one
/// left by a sidecar that died); while another process serves it, binding fails instead of
/// silently stealing the path from under a running sidecar.
pub async fn bind(address: &LocalAddress) -> Result<LocalListener, String> {
    match address {
        LocalAddress::Tcp(socket) => {
            let listener = tokio::net::TcpListener::bind(socket)
                .await
                .map_err(|e| format!("--local {socket}: cannot listen: {e}"))?;
            Ok(LocalListener::Tcp(listener, address.clone()))
        }
        LocalAddress::Unix(path) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                match tokio::net::UnixStream::connect(path).await {
                    Ok(_) => {
                        return Err(format!(
                            "--local {}: another process (another worker?) is serving this socket; give each worker its own path",
                            path.display()
                        ));
                    }
                    Err(error) => {
                        info!(path = %path.display(), %error, "taking over a socket file nothing serves");
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
            let listener = tokio::net::UnixListener::bind(path)
                .map_err(|e| format!("--local {}: cannot listen: {e}", path.display()))?;
            Ok(LocalListener::Unix(listener, path.clone()))
        }
    }
}

/// Serves the local endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(
    emitter: Emitter,
    listener: LocalListener,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let service = TelemetryBridgeServer::new(LocalIngest {
        emitter,
        shutdown: shutdown.clone(),
    })
    .max_decoding_message_size(MAX_LOCAL_MESSAGE_BYTES);
    let router = Server::builder().tcp_nodelay(true).add_service(service);
    let stop = shutdown.clone().cancelled_owned();
    match listener {
        LocalListener::Tcp(listener, address) => {
            info!(local = %address, "local endpoint listening");
            router
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stop,
                )
                .await
                .map_err(|e| e.to_string())
        }
        LocalListener::Unix(listener, path) => {
            info!(local = %LocalAddress::Unix(path.clone()), "local endpoint listening");
            let served = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    stop,
                )
                .await
                .map_err(|e| e.to_string());
            let _ = std::fs::remove_file(&path);
            served
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link (as the Python SDK makes one for `unix:///PATH`) reaches the local endpoint over
    /// its socket, and its events are confirmed there and taken into the sidecar's buffer.
    #[tokio::test]
    async fn a_link_reaches_the_local_endpoint_over_a_unix_socket() {
        use std::time::Duration;

        use crate::link::{Link, LinkOptions, LinkState};

        let dir = std::env::temp_dir().join(format!("worker-local-uds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("worker.sock");
        let sidecar = Emitter::detached(64);
        let shutdown = CancellationToken::new();
        let listener = bind(&LocalAddress::Unix(path.clone())).await.unwrap();
        let server = tokio::spawn(serve(sidecar.clone(), listener, shutdown.clone()));
        let mut options = LinkOptions::new(format!("unix://{}", path.display()), "app-1");
        options.linger = Duration::ZERO;
        options.backoff_initial = Duration::from_millis(10);
        let link = Link::start(options).unwrap();
        let mut state = link.state();
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| matches!(s, LinkState::Connected { .. })),
        )
        .await
        .expect("connected over the socket")
        .unwrap();
        link.emitter()
            .emit("cache.hit", &[("bytes", 4096.into())], &[], None);
        let counters = link.close(Duration::from_secs(10)).await;
        assert_eq!((counters.accepted, counters.confirmed), (1, 1));
        assert_eq!(sidecar.buffered_names(), ["cache.hit"]);
        shutdown.cancel();
        server.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_unix_address_needs_a_path() {
        for bad in ["unix://", "unix:"] {
            let err = crate::link::validate(&crate::link::LinkOptions::new(bad, "w")).unwrap_err();
            assert!(err.to_string().contains("needs a socket path"), "{err}");
        }
        assert!(
            crate::link::validate(&crate::link::LinkOptions::new("unix:///run/w.sock", "w"))
                .is_ok()
        );
    }

    #[test]
    fn parses_loopback_addresses_and_socket_paths_only() {
        assert_eq!(
            "127.0.0.1:50052".parse::<LocalAddress>(),
            Ok(LocalAddress::Tcp("127.0.0.1:50052".parse().unwrap()))
        );
        assert_eq!(
            "/run/w.sock".parse::<LocalAddress>(),
            Ok(LocalAddress::Unix("/run/w.sock".into()))
        );
        assert_eq!(
            "unix:/run/w.sock".parse::<LocalAddress>(),
            Ok(LocalAddress::Unix("/run/w.sock".into()))
        );
        assert!(
            "0.0.0.0:50052"
                .parse::<LocalAddress>()
                .unwrap_err()
                .contains("not a loopback")
        );
        assert!(
            "localhost"
                .parse::<LocalAddress>()
                .unwrap_err()
                .contains("neither")
        );
    }
}
