//! A typed client of the hub, for the CLI, the demo and tests.

use std::time::Duration;

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
    address: String,
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
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Unreachable {
                address: address.to_owned(),
                message: error_chain(&e),
            })?;
        Ok(Self {
            inner: TelemetryBridgeClient::with_interceptor(channel, authorize)
                .max_decoding_message_size(64 * 1024 * 1024),
            address: address.to_owned(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
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
        let response = self
            .inner
            .list_workers(v1::ListWorkersRequest {
                selector: selector.map(v1::Selector::from),
            })
            .await?;
        Ok(response.into_inner())
    }

    pub async fn update_control(
        &mut self,
        selector: &Selector,
        change: &Change,
        wait: Duration,
    ) -> Result<v1::UpdateControlResponse, ClientError> {
        let request = v1::UpdateControlRequest {
            selector: Some(v1::Selector::from(selector)),
            change: Some(v1::update_control_request::Change::from(change)),
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        Ok(self.inner.update_control(request).await?.into_inner())
    }

    pub async fn get_control(
        &mut self,
        selector: &Selector,
    ) -> Result<v1::GetControlResponse, ClientError> {
        let request = v1::GetControlRequest {
            selector: Some(v1::Selector::from(selector)),
        };
        Ok(self.inner.get_control(request).await?.into_inner())
    }

    pub async fn subscribe(
        &mut self,
        request: v1::SubscribeRequest,
    ) -> Result<tonic::Streaming<v1::SubscribeResponse>, ClientError> {
        Ok(self.inner.subscribe(request).await?.into_inner())
    }
}
