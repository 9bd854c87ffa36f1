//! Subscription items encoded once, shared by every subscriber that receives them.
//!
//! Fan-out to N subscribers would otherwise encode the same event N times. The hub encodes a
//! `SubscribeResponse` once into [`Bytes`]; each subscriber's stream holds a cheap clone, and
//! this type's [`prost::Message`] impl writes those bytes verbatim. On the wire it is exactly a
//! `v1::SubscribeResponse`, so clients decode it with the generated type.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType, skip_field},
};

use crate::v1::{EventDelivery, LagNotice, SubscribeResponse, subscribe_response::Item};

/// A `SubscribeResponse` already encoded; cloning it is a reference-count increment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedSubscribeResponse {
    bytes: Bytes,
}

impl EncodedSubscribeResponse {
    /// Encodes an event delivery.
    pub fn event(delivery: EventDelivery) -> Self {
        Self::encode(SubscribeResponse {
            item: Some(Item::Event(delivery)),
        })
    }

    /// Encodes a lag notice for `skipped` missed events.
    pub fn lagged(skipped: u64) -> Self {
        Self::encode(SubscribeResponse {
            item: Some(Item::Lagged(LagNotice { skipped })),
        })
    }

    fn encode(message: SubscribeResponse) -> Self {
        Self {
            bytes: Bytes::from(message.encode_to_vec()),
        }
    }

    /// The encoded `SubscribeResponse`.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }
}

impl Message for EncodedSubscribeResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    /// Only the hub encodes this type; anything decoding it is skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::TelemetryEvent;

    #[test]
    fn encodes_exactly_as_the_generated_message() {
        let delivery = EventDelivery {
            worker_id: "gpu-3".into(),
            pool: "llama".into(),
            event: Some(TelemetryEvent {
                event_parts: vec!["inference".into(), "stop".into()],
                correlation_id: "req-1".into(),
                ..Default::default()
            }),
            sampling_rate: 0.5,
            received_ns: 7,
        };
        let encoded = EncodedSubscribeResponse::event(delivery.clone());
        let decoded = SubscribeResponse::decode(encoded.encode_to_vec().as_slice())
            .expect("decodes as SubscribeResponse");
        assert_eq!(decoded.item, Some(Item::Event(delivery)));

        let lag = EncodedSubscribeResponse::lagged(42).encode_to_vec();
        let decoded = SubscribeResponse::decode(lag.as_slice()).expect("decodes");
        assert_eq!(decoded.item, Some(Item::Lagged(LagNotice { skipped: 42 })));
    }
}
