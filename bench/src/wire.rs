//! Clients for the benchmark's load processes: worker streams that send pre-encoded events and
//! acknowledge control, and subscriptions that count deliveries without decoding them.

use std::{pin::Pin, time::Duration};

use bridge_proto::{
    encoded::EncodedEvent,
    protocol::{events, headers},
    v1::{self, telemetry_control::Control},
    worker_client::telemetry_bridge_client::TelemetryBridgeClient,
};
use bytes::Buf;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{
    Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
};

/// A connection with the flow-control settings the hub uses.
pub async fn connect(target: &str) -> Result<Channel, String> {
    Endpoint::from_shared(target.to_owned())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connect to {target}: {e}"))
}

/// A protocol event acknowledging a control version.
pub fn ack(version: u64) -> EncodedEvent {
    let mut event = v1::TelemetryEvent {
        event_parts: events::CONTROL_APPLIED.map(str::to_owned).to_vec(),
        ..Default::default()
    };
    event.measurements.insert(
        events::CONTROL_APPLIED_VERSION.into(),
        v1::TelemetryValue {
            value: Some(v1::telemetry_value::Value::IntValue(
                i64::try_from(version).unwrap_or(i64::MAX),
            )),
        },
    );
    EncodedEvent::from_bytes(event.encode_to_vec().into())
}

/// Opens a worker stream named `id` that sends `events` and acknowledges every control state;
/// the returned stream yields each version it applied.
pub async fn worker_stream(
    channel: Channel,
    id: &str,
    events: impl Stream<Item = EncodedEvent> + Send + 'static,
) -> Result<Pin<Box<dyn Stream<Item = u64> + Send>>, Status> {
    let (acks, ack_rx) = mpsc::unbounded_channel();
    // Acknowledgements go first so that a saturated stream still answers control promptly.
    let outbound = futures_util::stream::select_with_strategy(
        tokio_stream::wrappers::UnboundedReceiverStream::new(ack_rx),
        events,
        |_: &mut ()| futures_util::stream::PollNext::Left,
    );
    let mut request = Request::new(outbound);
    let metadata = request.metadata_mut();
    metadata.insert(
        headers::WORKER_ID,
        id.parse().map_err(|_| Status::internal("worker id"))?,
    );
    metadata.insert(
        headers::CONTROL_ACK,
        headers::CONTROL_ACK_YES.parse().expect("ascii"),
    );
    metadata.insert(
        headers::WORKER_INSTANCE,
        format!("{:016x}", rand::random::<u64>())
            .parse()
            .expect("ascii"),
    );
    let mut client = TelemetryBridgeClient::new(channel);
    let inbound = client.stream_telemetry(request).await?.into_inner();
    Ok(Box::pin(inbound.filter_map(
        move |control| match control.ok()?.control? {
            Control::State(state) => {
                let _ = acks.send(ack(state.version));
                Some(state.version)
            }
            _ => None,
        },
    )))
}

/// One subscription item, barely decoded: which kind, and for a lag notice how many were
/// skipped; for deliveries in latency mode, the event's timestamp.
#[derive(Debug, Clone, Copy)]
pub enum RawItem {
    Event { timestamp_ns: i64 },
    Lagged(u64),
}

/// Decodes `SubscribeResponse`s just enough to count them (and, with `timestamps`, to read the
/// event's timestamp), so that subscribers cost the hub's machine as little as possible.
#[derive(Debug, Clone, Copy)]
pub struct CountingCodec {
    pub timestamps: bool,
}

impl Codec for CountingCodec {
    type Encode = v1::SubscribeRequest;
    type Decode = RawItem;
    type Encoder = RequestEncoder;
    type Decoder = CountingCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

#[derive(Debug)]
pub struct RequestEncoder;

impl Encoder for RequestEncoder {
    type Item = v1::SubscribeRequest;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for CountingCodec {
    type Item = RawItem;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RawItem>, Status> {
        let first = src.chunk().first().copied();
        if first == Some(0x12) || !self.timestamps {
            let item = if first == Some(0x12) {
                let response = v1::SubscribeResponse::decode(&mut *src)
                    .map_err(|e| Status::internal(e.to_string()))?;
                match response.item {
                    Some(v1::subscribe_response::Item::Lagged(lag)) => RawItem::Lagged(lag.skipped),
                    _ => RawItem::Lagged(0),
                }
            } else {
                RawItem::Event { timestamp_ns: 0 }
            };
            src.advance(src.remaining());
            return Ok(Some(item));
        }
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(RawItem::Event {
            timestamp_ns: delivery_timestamp(&bytes).unwrap_or(0),
        }))
    }
}

/// The field `tag` of an encoded message: `Ok` with the raw bytes of a length-delimited field,
/// `Err` with the value of a varint; other fields are skipped without decoding them.
fn field(mut message: &[u8], tag: u32) -> Option<Result<&[u8], u64>> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    while !message.is_empty() {
        let (field, wire_type) = decode_key(&mut message).ok()?;
        match wire_type {
            WireType::Varint => {
                let value = decode_varint(&mut message).ok()?;
                if field == tag {
                    return Some(Err(value));
                }
            }
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut message).ok()?).ok()?;
                let (body, rest) = message.split_at_checked(len)?;
                if field == tag {
                    return Some(Ok(body));
                }
                message = rest;
            }
            WireType::SixtyFourBit => message = message.get(8..)?,
            WireType::ThirtyTwoBit => message = message.get(4..)?,
            _ => return None,
        }
    }
    None
}

/// `SubscribeResponse.event.event.timestamp_ns`, read without decoding the rest: a subscriber
/// measuring latency must not be the bottleneck it measures.
fn delivery_timestamp(response: &[u8]) -> Option<i64> {
    let delivery = field(response, 1)?.ok()?;
    let event = field(delivery, 3)?.ok()?;
    field(event, 4)?.err().map(|v| v as i64)
}

/// Subscribes with the counting codec.
pub async fn subscribe(
    channel: Channel,
    request: v1::SubscribeRequest,
    timestamps: bool,
) -> Result<tonic::Streaming<RawItem>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::from_static("/telemetry.bridge.v1.TelemetryBridge/Subscribe");
    Ok(grpc
        .server_streaming(Request::new(request), path, CountingCodec { timestamps })
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::encoded::EncodedSubscribeResponse;

    #[test]
    fn reads_the_timestamp_without_decoding() {
        let event = v1::TelemetryEvent {
            event_parts: vec!["a".into()],
            metadata: [("k".to_owned(), "v".to_owned())].into(),
            timestamp_ns: 1_795_000_000_123_456_789,
            correlation_id: "id".into(),
            sequence: 5,
            sampling_rate: 0.5,
            ..Default::default()
        };
        let response = EncodedSubscribeResponse::delivery("w", "p", &event, 0.5, 42);
        assert_eq!(
            delivery_timestamp(response.as_bytes()),
            Some(1_795_000_000_123_456_789)
        );
    }
}
