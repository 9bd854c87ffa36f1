//! Compiles `bridge.proto` with `protox` (pure Rust, no system `protoc`).
//!
//! Two passes over the same descriptors:
//! - `full/`: every message, the client, and nothing else;
//! - `server/`: only the service trait, with every message taken from `full/` except
//!   `SubscribeResponse`, which the hub sends as bytes it encoded once for all subscribers
//!   (`crate::encoded::EncodedSubscribeResponse`), and `TelemetryEvent`, which it receives as a
//!   view of the bytes (`crate::view::EventView`);
//! - `worker_client/`: only the client, sending `TelemetryEvent`s that workers encoded when they
//!   accepted them and keep, encoded, until the hub confirms receipt
//!   (`crate::encoded::EncodedEvent`).

use std::{env, fs, io, path::PathBuf};

fn main() -> io::Result<()> {
    let proto = "telemetry/bridge/v1/bridge.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::compile([proto], ["."]).map_err(io::Error::other)?;
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| io::Error::other("OUT_DIR"))?);

    let descriptor_path = out.join("bridge_descriptor.bin");
    fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    let full = out.join("full");
    fs::create_dir_all(&full)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .out_dir(&full)
        .compile_fds(fds.clone())?;

    let server = out.join("server");
    fs::create_dir_all(&server)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .extern_path(".telemetry.bridge.v1", "crate::v1")
        .extern_path(
            ".telemetry.bridge.v1.SubscribeResponse",
            "crate::encoded::EncodedSubscribeResponse",
        )
        .extern_path(
            ".telemetry.bridge.v1.TelemetryEvent",
            "crate::view::EventView",
        )
        .codec_path("crate::codec::LeanCodec")
        .out_dir(&server)
        .compile_fds(fds.clone())?;

    let worker_client = out.join("worker_client");
    fs::create_dir_all(&worker_client)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .extern_path(".telemetry.bridge.v1", "crate::v1")
        .extern_path(
            ".telemetry.bridge.v1.TelemetryEvent",
            "crate::encoded::EncodedEvent",
        )
        .out_dir(&worker_client)
        .compile_fds(fds)?;
    Ok(())
}
