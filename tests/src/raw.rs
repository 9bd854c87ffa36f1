//! gRPC calls with hand-made message bytes, as a broken or hostile client sends them.

use bytes::{Buf, BufMut, Bytes};
use tokio_stream::StreamExt;
use tonic::{
    Request, Status, Streaming,
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

/// Sends and receives message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

async fn client(address: &str) -> Grpc<Channel> {
    // `Endpoint` (unlike `Channel::from_shared`) also dials `unix://PATH`.
    let channel = Endpoint::from_shared(address.to_owned())
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut grpc = Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc
}

/// A unary call to `path` (e.g. `/telemetry.bridge.v1.TelemetryBridge/ListWorkers`) with
/// `message` as its encoded request.
pub async fn unary(address: &str, path: &'static str, message: Bytes) -> Result<Bytes, Status> {
    let mut grpc = client(address).await;
    let response = grpc
        .unary(
            Request::new(message),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?;
    Ok(response.into_inner())
}

/// A client-streaming call to `path` that sends `messages` as they are, then waits: the
/// responses, or the status the call was refused with.
pub async fn stream(
    address: &str,
    path: &'static str,
    metadata: &[(&'static str, &str)],
    messages: Vec<Bytes>,
) -> Result<Streaming<Bytes>, Status> {
    let mut grpc = client(address).await;
    let outbound = tokio_stream::iter(messages).chain(tokio_stream::pending());
    let mut request = Request::new(outbound);
    for (key, value) in metadata {
        let value: MetadataValue<_> = value.parse().expect("metadata value");
        request.metadata_mut().insert(*key, value);
    }
    let response = grpc
        .streaming(request, PathAndQuery::from_static(path), RawCodec)
        .await?;
    Ok(response.into_inner())
}
