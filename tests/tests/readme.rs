//! The README's shell examples run as written against a real hub.
//!
//! Every ```sh block of README.md is either run here, command by command in a fresh hub with a
//! worker `gpu-3` (pool `llama`) like the one the examples talk to, or listed in [`NOT_RUN`]
//! with the reason: a block added to the README fails this test until it is one or the other.
//! Commands run under `bash -o pipefail` with the `bridge` and `worker` under test first on the
//! PATH, `BRIDGE_HUB` pointing at the hub, and the README's `localhost:9464` at its HTTP port.

use std::{path::Path, process::Command, time::Duration};

use bridge_proto::protocol::headers;
use bridge_proto::v1;
use bridge_tests::{
    HubProcess, WorkerProcess, bin, eventually, open_stream, repo_root, skip_without, worker_info,
};

const WAIT: Duration = Duration::from_secs(20);

/// The trace id the README's `bridge subscribe --trace` example follows.
const README_TRACE: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];

/// Blocks not run, by their first command, and why.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "cargo run --release --bin bridge -- demo",
        "the quick start: the demo has its own test, ./test.sh is this suite",
    ),
    (
        "bridge serve",
        "starts hubs on the fixed default ports; every test here starts `bridge serve`",
    ),
    (
        "worker --hub http://hub:50051 --id gpu-3 --pool llama-70b --label zone=us-east1-b -- python serve.py",
        "wraps an app that is not here; tests/tests/sidecar.rs runs the sidecar",
    ),
    (
        "pip install ./python",
        "builds the Python SDK; ./test.sh installs it and tests/tests/python_sdk.rs runs its suite",
    ),
    (
        "cargo run --release -p bridge-bench",
        "the benchmark takes minutes; tests/tests/bench.rs runs it with --quick",
    ),
    (
        "nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats &",
        "two hubs on fixed ports with NATS; tests/tests/cluster*.rs run the same setup",
    ),
    (
        "bridge serve --config hub.toml --listen 0.0.0.0:50051",
        "needs certificates and tokens; tests/tests/security.rs covers TLS and tokens",
    ),
];

/// The README's ```sh blocks, each as its commands (continuation lines joined, comments cut).
fn shell_blocks(readme: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    let mut pending = String::new();
    for line in readme.lines() {
        let trimmed = line.trim();
        match &mut current {
            None if trimmed == "```sh" => current = Some(Vec::new()),
            None => {}
            Some(commands) if trimmed == "```" => {
                blocks.push(std::mem::take(commands));
                current = None;
            }
            Some(commands) => {
                pending.push_str(trimmed.trim_end_matches('\\').trim_end());
                if trimmed.ends_with('\\') {
                    pending.push(' ');
                    continue;
                }
                let command = strip_comment(&pending).trim().to_owned();
                pending.clear();
                if !command.is_empty() {
                    commands.push(command);
                }
            }
        }
    }
    blocks
}

/// `line` without a trailing `# comment` (a `#` after whitespace, outside quotes).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => return &line[..i],
            _ => {}
        }
        previous = c;
    }
    line
}

/// How a command is expected to end.
#[derive(Debug, PartialEq)]
enum Ending {
    /// Exits 0.
    Done,
    /// Streams until stopped: stopped after a few seconds, having printed something.
    Streams,
}

/// The command as run here, and how it should end; `None` for an interactive one.
fn as_run(command: &str, http: &str) -> Option<(String, Ending)> {
    if command.starts_with("bridge top") {
        return None; // interactive; tests/tests/top.rs drives it in a terminal
    }
    let command = command.replace("localhost:9464", http);
    if let Some(rest) = command.strip_prefix("curl ") {
        // A 4xx or 5xx must fail the example, not just print an error body.
        let streams = rest.starts_with("-N ");
        let limit = if streams { 3 } else { 15 };
        let run = format!("curl --fail-with-body --max-time {limit} {rest}");
        return Some((
            run,
            if streams {
                Ending::Streams
            } else {
                Ending::Done
            },
        ));
    }
    if command.starts_with("bridge subscribe") && !command.contains("--limit") {
        return Some((format!("timeout 3 {command}"), Ending::Streams));
    }
    Some((command, Ending::Done))
}

/// A hub with the worker the examples address (with the label they use), `gpu.metrics` flowing fast enough for
/// `bridge subscribe 'gpu.*' --limit 100` (the simulated worker reports once a second), and
/// requests of the trace the `--trace` example follows.
struct Stage {
    hub: HubProcess,
    _worker: WorkerProcess,
    _gpu_feed: tokio::task::JoinHandle<()>,
}

impl Stage {
    async fn new() -> Self {
        let hub = HubProcess::start();
        let worker = WorkerProcess::start(
            &hub.url,
            "gpu-3",
            "llama",
            &["--simulate", "50", "--label", "zone=us-east1-b"],
        );
        let mut client = hub.client().await;
        eventually("gpu-3 to connect and apply its control", WAIT, || {
            let mut client = client.clone();
            async move {
                worker_info(&mut client, "gpu-3")
                    .await
                    .filter(|w| w.applied_version.is_some())
            }
        })
        .await;
        let (events, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-feed")])
            .await
            .expect("stream");
        let gpu_feed = tokio::spawn(async move {
            let _controls = _controls;
            let event = v1::TelemetryEvent {
                event_parts: vec!["gpu".into(), "metrics".into()],
                metadata: [("device".to_owned(), "0".to_owned())].into(),
                ..Default::default()
            };
            let traced = v1::TelemetryEvent {
                event_parts: vec!["inference".into(), "stop".into()],
                trace_id: README_TRACE.to_vec(),
                span_id: vec![0x0a; 8],
                ..Default::default()
            };
            while events.send(event.clone()).await.is_ok()
                && events.send(traced.clone()).await.is_ok()
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Self {
            hub,
            _worker: worker,
            _gpu_feed: gpu_feed,
        }
    }

    fn run(&self, command: &str, ending: &Ending) -> (String, String) {
        let bin_dir = bin("bridge").parent().expect("bin dir").to_owned();
        let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))
        .expect("PATH");
        let out = Command::new("bash")
            .args(["-o", "pipefail", "-c", command])
            .env("PATH", path)
            .env("BRIDGE_HUB", &self.hub.url)
            .current_dir(repo_root())
            .output()
            .expect("run bash");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        let ok = match ending {
            Ending::Done => out.status.success(),
            // timeout(1) exits 124, curl --max-time 28.
            Ending::Streams => {
                matches!(out.status.code(), Some(124 | 28)) && !stdout.trim().is_empty()
            }
        };
        assert!(
            ok,
            "README example `{command}` ended with {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}\nhub log:\n{}",
            out.status,
            self.hub.log()
        );
        (stdout, stderr)
    }
}

fn tools_present() -> bool {
    for tool in ["curl", "jq"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip_without(
                "BRIDGE_REQUIRE_README_TOOLS",
                &format!("no {tool} for the README's examples"),
            );
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_shell_examples_run_as_written() {
    if !tools_present() {
        return;
    }
    let readme =
        std::fs::read_to_string(Path::new(&repo_root()).join("README.md")).expect("README.md");
    let blocks = shell_blocks(&readme);
    assert!(blocks.len() >= 5, "found {} ```sh blocks", blocks.len());
    let mut ran = 0;
    for block in &blocks {
        let first = block.first().map(String::as_str).unwrap_or_default();
        if NOT_RUN
            .iter()
            .any(|(start, _)| first == *start || first.starts_with(&format!("{start} ")))
        {
            continue;
        }
        let stage = Stage::new().await;
        let http = stage.hub.http.to_string();
        for command in block {
            let Some((run, ending)) = as_run(command, &http) else {
                continue;
            };
            let (stdout, _) = stage.run(&run, &ending);
            if command.contains("/api/events") {
                assert!(
                    stdout.contains("data: {") && stdout.contains("\"inference."),
                    "the live tail showed events: {stdout}"
                );
            }
            ran += 1;
        }
    }
    assert!(ran >= 20, "ran {ran} README commands");
}

#[test]
fn blocks_are_split_into_commands_without_comments() {
    let readme = "text\n```sh\nbridge a 'x # y'   # comment\nworker --x \\\n   --y z\n```\n```rust\nnot(this)\n```\n";
    assert_eq!(
        shell_blocks(readme),
        vec![vec![
            "bridge a 'x # y'".to_owned(),
            "worker --x --y z".to_owned()
        ]]
    );
}
