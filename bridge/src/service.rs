//! The gRPC edge: converts requests into domain types, calls the hub, maps errors to statuses.

use std::pin::Pin;

use bridge_proto::{
    encoded::EncodedSubscribeResponse, server::telemetry_bridge_server, v1, view::EventView,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth::{Access, check_certificate_name},
    command::{Selector, parse_update},
    hub::{Hub, Requester},
    outputs::subscribers::FeedItem,
    registry::Identity,
    worker_stream,
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `telemetry.bridge.v1.TelemetryBridge`, served by a [`Hub`].
#[derive(Debug, Clone)]
pub struct BridgeService {
    hub: Hub,
}

impl BridgeService {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }
}

#[tonic::async_trait]
impl telemetry_bridge_server::TelemetryBridge for BridgeService {
    type StreamTelemetryStream = BoxStream<v1::TelemetryControl>;
    type SubscribeStream = BoxStream<EncodedSubscribeResponse>;

    async fn stream_telemetry(
        &self,
        request: Request<Streaming<EventView>>,
    ) -> Result<Response<Self::StreamTelemetryStream>, Status> {
        if self.hub.shutdown_token().is_cancelled() {
            return Err(Status::unavailable("the hub is shutting down"));
        }
        self.hub.auth().check(request.metadata(), Access::Stream)?;
        let peer_certs = request.peer_certs();
        let identity = Identity::from_metadata(
            request.metadata(),
            request.remote_addr(),
            self.hub.config().hub.require_worker_id || peer_certs.is_some(),
        )?;
        if let Some(cert) = peer_certs.as_deref().and_then(|certs| certs.first()) {
            check_certificate_name(cert, &identity.id)?;
        }
        let limit = self.hub.config().limits.max_worker_streams;
        if self
            .hub
            .registry()
            .get(&identity.id)
            .is_none_or(|w| !w.details().connected)
            && self.hub.registry().connected() >= limit
        {
            return Err(Status::resource_exhausted(format!(
                "this hub serves at most {limit} worker streams (limits.max_worker_streams)"
            )));
        }
        let session = self.hub.connect(&identity);
        tokio::spawn(worker_stream::ingest(
            self.hub.clone(),
            session.clone(),
            request.into_inner(),
        ));
        Ok(Response::new(Box::pin(worker_stream::controls(
            session,
            identity.acknowledges,
            self.hub.config().event_limits(),
        ))))
    }

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.hub.auth().check(request.metadata(), Access::Read)?;
        let tail = self.hub.subscribe(request.into_inner())?;
        Ok(Response::new(Box::pin(tail.map(|item| match item {
            FeedItem::Event(response) => Ok(response),
            FeedItem::Lagged(skipped) => Ok(EncodedSubscribeResponse::lagged(skipped)),
            FeedItem::ShuttingDown => Err(Status::unavailable("the hub is shutting down")),
        }))))
    }

    async fn list_workers(
        &self,
        request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        self.hub.auth().check(request.metadata(), Access::Read)?;
        let selector = match request.into_inner().selector {
            None => None,
            some => Some(Selector::try_from(some)?),
        };
        Ok(Response::new(
            self.hub.list_workers(selector.as_ref()).await,
        ))
    }

    async fn update_control(
        &self,
        request: Request<v1::UpdateControlRequest>,
    ) -> Result<Response<v1::UpdateControlResponse>, Status> {
        let token = self.hub.auth().check(request.metadata(), Access::Admin)?;
        let requester = Requester {
            token,
            via: "grpc",
            peer: request.remote_addr(),
        };
        let update = parse_update(request.into_inner())?;
        let response = self.hub.update_control(&update, requester).await?;
        Ok(Response::new(response))
    }

    async fn get_control(
        &self,
        request: Request<v1::GetControlRequest>,
    ) -> Result<Response<v1::GetControlResponse>, Status> {
        self.hub.auth().check(request.metadata(), Access::Read)?;
        let selector = Selector::try_from(request.into_inner().selector)?;
        Ok(Response::new(self.hub.describe_control(&selector).await?))
    }
}
