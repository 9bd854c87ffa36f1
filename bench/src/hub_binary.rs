//! The hub under test: the real `bridge` binary, with its allocator and everything else a user
//! runs, taken from the target profile directory this binary runs from.
//!
//! Cargo builds only the binaries of the package it runs, so `cargo run -p bridge-bench` on its
//! own would measure whatever `bridge` an earlier build left there. Under cargo (which sets
//! `CARGO` for the programs it runs) the hub is therefore built first, in the same profile and
//! target directory; outside cargo it must already be there.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, progress};

const PACKAGE: &str = "telemetry-bridge";
const BINARY: &str = "bridge";

/// The `bridge` binary next to this executable, built first when running under cargo.
pub(crate) fn locate() -> Result<PathBuf, Error> {
    let exe = env::current_exe()
        .map_err(|e| Error::Hub(format!("cannot tell where this executable is: {e}")))?;
    let profile_dir = exe
        .parent()
        .ok_or_else(|| Error::Hub(format!("{} has no directory", exe.display())))?;
    if let Some(cargo) = env::var_os("CARGO") {
        build(&cargo, profile_dir)?;
    }
    let hub = profile_dir.join(format!("{BINARY}{}", env::consts::EXE_SUFFIX));
    if !hub.is_file() {
        return Err(Error::Hub(format!(
            "no `{BINARY}` binary next to {}: the benchmark measures that one; build it with \
             `cargo build --release -p {PACKAGE}`, or run the benchmark with \
             `cargo run --release -p bridge-bench`",
            exe.display()
        )));
    }
    progress(&format!("measuring the hub {}", hub.display()));
    Ok(hub)
}

/// `cargo build --bin bridge` into `profile_dir` (`target/<profile>`).
fn build(cargo: &OsStr, profile_dir: &Path) -> Result<(), Error> {
    let mut build = Command::new(cargo);
    build.args(["build", "-p", PACKAGE, "--bin", BINARY]);
    let sibling = bridge::workspace::sibling_build(profile_dir);
    build.args(&sibling.args);
    for key in &sibling.remove_env {
        build.env_remove(key);
    }
    progress(&format!(
        "building the hub under test: cargo {}",
        build
            .get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    // Cargo's output goes to stderr with the progress lines: stdout is the report's.
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| Error::Hub(format!("cannot run cargo ({}): {e}", cargo.display())))?;
    if !status.success() {
        return Err(Error::Hub(format!(
            "building the hub under test failed ({status}); cargo's output is above"
        )));
    }
    Ok(())
}
