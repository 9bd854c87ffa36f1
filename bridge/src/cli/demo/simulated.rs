//! The demo's simulated model servers: real `worker --simulate` processes, as users run them.
//!
//! The `worker` binary is the one beside the running `bridge`. Under `cargo run` it is built
//! first, in the same profile, so that the demo works on a fresh checkout; elsewhere a missing
//! binary is one line saying so. The processes are stopped on every way out of the demo: at its
//! end, on an error, on Ctrl-C or SIGTERM (the caller's select drops the demo and then calls
//! [`Workers::stop`]), and, failing all else, killed when [`Workers`] is dropped.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    io::AsyncReadExt,
    process::{Child, Command},
};

use crate::cli::Failure;

/// How long a worker may take to drain to the hub and exit once asked to.
const DRAIN: Duration = Duration::from_secs(2);

/// The `worker` binary to run: built now when running under cargo, else beside `bridge`.
pub async fn worker_binary() -> Result<PathBuf, Failure> {
    let bridge = std::env::current_exe()
        .map_err(|e| Failure::new(1, format!("cannot locate the bridge executable: {e}")))?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        return build(&cargo, &bridge).await;
    }
    let worker = bridge.with_file_name("worker");
    if worker.is_file() {
        Ok(worker)
    } else {
        Err(Failure::new(
            1,
            format!(
                "the demo runs `worker` processes and there is no {}: install `worker` beside \
                 `bridge`, or run the demo with `cargo run --bin bridge -- demo`",
                worker.display()
            ),
        ))
    }
}

/// `cargo build --bin worker` in the profile `bridge` was built in; cargo's own messages show
/// on stderr, and its report of what it built says where the binary is.
async fn build(cargo: &OsString, bridge: &Path) -> Result<PathBuf, Failure> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        // Resolved together with the bridge package, as the integration tests build the two
        // binaries: built on its own the worker gets other dependency features, and each build
        // would recompile what the other left.
        .args([
            "-p",
            "telemetry-bridge",
            "-p",
            "telemetry-worker",
            "--bin",
            "worker",
            "--message-format=json-render-diagnostics",
        ]);
    if let Some(profile_dir) = bridge.parent() {
        let sibling = bridge::workspace::sibling_build(profile_dir);
        command.args(&sibling.args);
        for key in &sibling.remove_env {
            command.env_remove(key);
        }
    }
    let failed = |detail: String| {
        Failure::new(
            1,
            format!("cannot build the `worker` binary the demo runs: {detail}"),
        )
    };
    let mut child = command
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("cannot run cargo: {e}")))?;
    let mut report = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout
            .read_to_string(&mut report)
            .await
            .map_err(|e| failed(format!("reading cargo's report: {e}")))?;
    }
    let status = child.wait().await.map_err(|e| failed(e.to_string()))?;
    if !status.success() {
        return Err(failed(format!(
            "cargo build {status} (its errors are above)"
        )));
    }
    // The worker library is named `worker` too, and has no executable.
    report
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == "worker"
        })
        .find_map(|artifact| artifact["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| failed("cargo did not report building it".into()))
}

/// The simulated workers started so far.
#[derive(Debug, Default)]
pub struct Workers {
    children: Vec<(String, Child)>,
}

impl Workers {
    /// Starts `worker --simulate` as worker `id` of pool `model`, on the demo's hub.
    pub fn start(
        &mut self,
        binary: &Path,
        hub: &str,
        id: &str,
        model: &str,
        requests_per_second: f64,
    ) -> Result<(), Failure> {
        let mut command = Command::new(binary);
        command
            .args(["--hub", hub, "--id", id, "--pool", model, "--model", model])
            .arg("--simulate")
            .arg(requests_per_second.to_string())
            .arg("--drain-timeout")
            .arg(format!("{}ms", DRAIN.as_millis()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        // The demo's hub is a plaintext one on loopback that takes no tokens, with built-in
        // settings: a user's configuration and credentials are for their own hubs.
        for key in [
            "BRIDGE_CONFIG",
            "BRIDGE_TOKEN",
            "BRIDGE_CA",
            "BRIDGE_CERT",
            "BRIDGE_KEY",
        ] {
            command.env_remove(key);
        }
        // Like the rest of the demo, only warnings unless RUST_LOG asks for more: the workers
        // share its terminal.
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let child = command
            .spawn()
            .map_err(|e| Failure::new(1, format!("cannot run {}: {e}", binary.display())))?;
        self.children.push((id.to_owned(), child));
        Ok(())
    }

    /// A worker that has exited, and how, if any has: the demo cannot go on without it.
    pub fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|(id, child)| {
            let status = child.try_wait().ok()??;
            Some(format!("simulated worker {id} exited early ({status})"))
        })
    }

    /// Asks every worker to stop (SIGTERM: it drains to the hub), and kills those that have not
    /// exited after [`DRAIN`] and a little more.
    pub async fn stop(&mut self) {
        for (_, child) in &self.children {
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                // Fails only for a worker that is gone already.
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN + Duration::from_secs(1);
        for (_, mut child) in self.children.drain(..) {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}
