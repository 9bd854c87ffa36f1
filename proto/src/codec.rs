//! The hub's gRPC codec: prost, with small initial buffers.
//!
//! tonic allocates an 8 KiB encode buffer and an 8 KiB decode buffer for every stream up front.
//! A hub holds one stream per connected worker, most of them trickling or idle, so those buffers
//! would be most of its memory per worker; these start at 1 KiB and grow when a stream is busy.
//!
//! A message that does not decode is the peer's fault, so it is answered with INVALID_ARGUMENT
//! (prost's codec says INTERNAL, which reads as the server's fault) and counted
//! ([`malformed_messages`]), before any handler sees it.

use std::{
    marker::PhantomData,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
const INITIAL_BUFFER: usize = 1024;
/// How much an encoder gathers before handing it to the transport (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`INITIAL_BUFFER`]-sized buffers.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LeanDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        LeanDecoder(PhantomData)
    }
}

/// Messages this process's servers received and could not decode, since it started.
static MALFORMED: AtomicU64 = AtomicU64::new(0);

/// How many messages this process's servers (the hub, a sidecar's local endpoint) refused
/// because they did not decode.
pub fn malformed_messages() -> u64 {
    MALFORMED.load(Relaxed)
}

/// prost's decoder with [`INITIAL_BUFFER`]-sized buffers, answering INVALID_ARGUMENT.
#[derive(Debug)]
pub struct LeanDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for LeanDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| {
            MALFORMED.fetch_add(1, Relaxed);
            Status::invalid_argument(format!("malformed message: {error}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
