//! A typed client of the hub, for the CLI, the demo and tests.

use std::{future::Future, time::Duration};

use bridge_proto::{
    connect::{Authorize, ClientSecurity, SecurityError, error_chain},
    v1::{self, telemetry_bridge_client::TelemetryBridgeClient},
};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::command::{Change, Selector};

/// Why a call to the hub failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid hub address `{address}`: {message}")]
    InvalidAddress { address: String, message: String },
    #[error("hub unreachable at {address}: {message}")]
    Unreachable { address: String, message: String },
    /// The connection opened but the hub did not answer a call in time.
    #[error(
        "hub unreachable at {address}: no answer within {} (a hub that accepts connections but does not answer; --request-timeout sets the wait)",
        humantime::format_duration(*.after)
    )]
    NoAnswer { address: String, after: Duration },
    /// Something answered, but not in gRPC: another service, or the hub's HTTP port.
    #[error("{address} does not answer gRPC: {message}")]
    NotGrpc { address: String, message: String },
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
}

/// The generated client, with credentials added to every call.
pub type RawClient = TelemetryBridgeClient<InterceptedService<Channel, Authorize>>;

/// A connection to one hub.
#[derive(Debug, Clone)]
pub struct HubClient {
    inner: RawClient,
    peer: Peer,
    /// How long a call may take to be answered, on top of any wait the call asks for.
    request_timeout: Option<Duration>,
}

/// The hub as this client addresses it, to explain failures.
#[derive(Debug, Clone)]
struct Peer {
    address: String,
    https: bool,
    client_certificate: bool,
}

impl HubClient {
    /// Connects without credentials, over plaintext; see [`Self::connect_with`].
    pub async fn connect(address: &str, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_with(address, &ClientSecurity::default(), timeout).await
    }

    /// Connects now, so that an unreachable hub is reported before anything else happens.
    pub async fn connect_with(
        address: &str,
        security: &ClientSecurity,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let invalid = |message: String| ClientError::InvalidAddress {
            address: address.to_owned(),
            message,
        };
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(invalid("it must start with http:// or https://".into()));
        }
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024));
        let endpoint = security.configure(endpoint, address)?;
        let authorize = security.interceptor()?;
        let unreachable = |message: String| ClientError::Unreachable {
            address: address.to_owned(),
            message,
        };
        // The endpoint's own timeout covers the TCP connection only, not the TLS handshake a
        // silent peer never finishes.
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no connection within {} (--connect-timeout sets the wait)",
                    humantime::format_duration(timeout)
                ))
            })?
            .map_err(|e| {
                let chain = error_chain(&e);
                let message = match tls_hint(&chain) {
                    Some(hint) => format!("{chain}; {hint}"),
                    None => chain,
                };
                unreachable(message)
            })?;
        Ok(Self {
            inner: TelemetryBridgeClient::with_interceptor(channel, authorize)
                .max_decoding_message_size(64 * 1024 * 1024),
            peer: Peer {
                address: address.to_owned(),
                https: address.starts_with("https://"),
                client_certificate: security.cert.is_some(),
            },
            request_timeout: None,
        })
    }

    /// Gives up on a call the hub has not answered within `timeout` (plus the acknowledgement
    /// wait a control change asks for), with [`ClientError::NoAnswer`]. A subscription must
    /// be answered (its headers) in that time; its events then take as long as they take.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// `call`, bounded by the request timeout plus `wait`, with a failure explained.
    async fn answer<T>(
        request_timeout: Option<Duration>,
        peer: &Peer,
        wait: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        let outcome = match request_timeout {
            None => call.await,
            Some(timeout) => {
                let after = timeout.saturating_add(wait);
                tokio::time::timeout(after, call)
                    .await
                    .map_err(|_| ClientError::NoAnswer {
                        address: peer.address.clone(),
                        after,
                    })?
            }
        };
        match outcome {
            // A stream's headers arrive before its first message fails to decode.
            Ok(response) => match peer.not_grpc(response.metadata()) {
                Some(error) => Err(error),
                None => Ok(response.into_inner()),
            },
            Err(status) => Err(peer.explain(status).await),
        }
    }

    /// A failed call's status as a [`ClientError`] that says what is wrong when the connection
    /// rather than the hub failed, or what answered is not gRPC: for statuses from a stream.
    pub async fn explain(&self, status: tonic::Status) -> ClientError {
        self.peer.explain(status).await
    }

    pub fn address(&self) -> &str {
        &self.peer.address
    }

    /// The generated client, for calls this wrapper does not cover.
    pub fn raw(&mut self) -> &mut RawClient {
        &mut self.inner
    }

    pub async fn list_workers(
        &mut self,
        selector: Option<&Selector>,
    ) -> Result<Vec<v1::WorkerInfo>, ClientError> {
        Ok(self.list_workers_response(selector).await?.workers)
    }

    /// [`HubClient::list_workers`] with the hubs that did not answer (cluster mode).
    pub async fn list_workers_response(
        &mut self,
        selector: Option<&Selector>,
    ) -> Result<v1::ListWorkersResponse, ClientError> {
        let call = self.inner.list_workers(v1::ListWorkersRequest {
            selector: selector.map(v1::Selector::from),
        });
        Self::answer(self.request_timeout, &self.peer, Duration::ZERO, call).await
    }

    pub async fn update_control(
        &mut self,
        selector: &Selector,
        change: &Change,
        wait: Duration,
    ) -> Result<v1::UpdateControlResponse, ClientError> {
        self.update_control_for(selector, change, wait, None).await
    }

    /// [`Self::update_control`] for a change that undoes itself after `lasting`, if given.
    pub async fn update_control_for(
        &mut self,
        selector: &Selector,
        change: &Change,
        wait: Duration,
        lasting: Option<Duration>,
    ) -> Result<v1::UpdateControlResponse, ClientError> {
        let request = v1::UpdateControlRequest {
            selector: Some(v1::Selector::from(selector)),
            change: Some(v1::update_control_request::Change::from(change)),
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            for_ms: lasting.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        let call = self.inner.update_control(request);
        Self::answer(self.request_timeout, &self.peer, wait, call).await
    }

    pub async fn get_control(
        &mut self,
        selector: &Selector,
    ) -> Result<v1::GetControlResponse, ClientError> {
        let request = v1::GetControlRequest {
            selector: Some(v1::Selector::from(selector)),
        };
        let call = self.inner.get_control(request);
        Self::answer(self.request_timeout, &self.peer, Duration::ZERO, call).await
    }

    pub async fn subscribe(
        &mut self,
        request: v1::SubscribeRequest,
    ) -> Result<tonic::Streaming<v1::SubscribeResponse>, ClientError> {
        let call = self.inner.subscribe(request);
        Self::answer(self.request_timeout, &self.peer, Duration::ZERO, call).await
    }
}

impl Peer {
    /// `status` as the hub sent it, or, when the connection rather than the hub failed (a
    /// status with a source: TLS alerts, a closed connection) or what answered was not gRPC,
    /// what is wrong and what to try.
    async fn explain(&self, status: tonic::Status) -> ClientError {
        if let Some(error) = self.not_grpc(status.metadata()) {
            return error;
        }
        let Some(source) = std::error::Error::source(&status) else {
            return ClientError::Status(status);
        };
        let chain = error_chain(source);
        if !self.https && speaks_http1(&self.address).await {
            return ClientError::NotGrpc {
                address: self.address.clone(),
                message: format!(
                    "it answers HTTP/1.1 ({chain}); is this the hub's HTTP port (metrics, /api)? --hub takes the gRPC port (default 50051)"
                ),
            };
        }
        let hint = tls_hint(&chain).unwrap_or(match (self.https, self.client_certificate) {
            (false, _) => {
                "if the hub serves TLS, use an https:// address (with --ca PEM when its certificate is not from a public authority)"
            }
            (true, false) => {
                "if the hub requires client certificates (mutual TLS), pass --cert PEM and --key PEM"
            }
            (true, true) => {
                "the hub may not accept the client certificate (--cert): it must chain to the hub's tls.client_ca"
            }
        });
        ClientError::Unreachable {
            address: self.address.clone(),
            message: format!("the connection failed ({chain}); {hint}"),
        }
    }

    /// The error to report when response headers say that what answered is not gRPC.
    fn not_grpc(&self, headers: &tonic::metadata::MetadataMap) -> Option<ClientError> {
        let content_type = headers.get("content-type")?.to_str().unwrap_or("?");
        (!content_type.starts_with("application/grpc")).then(|| ClientError::NotGrpc {
            address: self.address.clone(),
            message: format!(
                "it answered {content_type}, not gRPC; is this the hub's HTTP port (metrics, /api)? --hub takes the gRPC port (default 50051)"
            ),
        })
    }
}

/// Whether an HTTP/1.1 server answers at `address` (`http://HOST:PORT`), such as the hub's HTTP
/// port, which closes a connection that opens with gRPC's HTTP/2 preface. Asked only after a
/// call failed, with a short limit.
async fn speaks_http1(address: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(authority) = address
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
    else {
        return false;
    };
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        let request = format!("HEAD / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 7];
        stream.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/1.")
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// What to do about a TLS failure that `chain` (an error and its causes) names.
fn tls_hint(chain: &str) -> Option<&'static str> {
    let hints = [
        (
            "CertificateRequired",
            "the hub requires a client certificate (mutual TLS): pass --cert PEM and --key PEM",
        ),
        (
            "UnknownIssuer",
            "the hub's certificate is not signed by a CA this client trusts: pass that CA with --ca PEM",
        ),
        (
            "NotValidForName",
            "the hub's certificate does not name this host: use a host name or address it lists",
        ),
        (
            "InvalidContentType",
            "the hub does not speak TLS at this address: use http://, or check the port",
        ),
        (
            // The hub's HTTP port over TLS offers HTTP/1.1 only.
            "NoApplicationProtocol",
            "the server does not speak HTTP/2 there, so not gRPC: is this the hub's HTTP port (metrics, /api)? --hub takes the gRPC port (default 50051)",
        ),
        (
            "UnknownCA",
            "the hub does not trust the client certificate (--cert): it must chain to the hub's tls.client_ca",
        ),
        (
            "BadCertificate",
            "the hub refused the client certificate (--cert): it must chain to the hub's tls.client_ca",
        ),
    ];
    hints
        .into_iter()
        .find(|(needle, _)| chain.contains(needle))
        .map(|(_, hint)| hint)
}
