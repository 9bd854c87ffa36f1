//! The benchmark's processes: servers (the hub under test, or the baseline) and load
//! processes, each started on loopback and read through its stdout, and the orchestrator's side
//! of their `mark` protocol (see [`role`](crate::role)).

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value as Json;
use worker::process::ProcessStat;

use crate::Plan;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Server {
    Hub,
    Baseline,
}

/// A process whose stdout lines the orchestrator reads and whose stdin it writes `mark` to: a
/// role of this binary, or a hub. Killed when dropped.
pub(crate) struct RoleProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl RoleProcess {
    /// `bridge-bench role ARGS`.
    fn role(args: &[String], env: &[(&str, &str)]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        Self::spawn(Command::new(exe).arg("role").args(args), env)
    }

    pub(crate) fn spawn(command: &mut Command, env: &[(&str, &str)]) -> Result<Self, String> {
        let mut child = command
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {command:?}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            lines,
        })
    }

    pub(crate) fn line(&mut self, timeout: Duration) -> Result<String, String> {
        self.lines.recv_timeout(timeout).map_err(|_| {
            format!(
                "no answer from process {} within {timeout:?}",
                self.child.id()
            )
        })
    }

    pub(crate) fn ready(&mut self, timeout: Duration) -> Result<(), String> {
        match self.line(timeout)?.as_str() {
            "ready" => Ok(()),
            other => Err(format!("expected `ready`, got `{other}`")),
        }
    }

    pub(crate) fn mark(&mut self) -> Result<Json, String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "mark").map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let line = self.line(Duration::from_secs(30))?;
        serde_json::from_str(&line).map_err(|e| format!("`{line}`: {e}"))
    }

    pub(crate) fn set_rate(&mut self, rate: f64) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "rate {rate}").map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hub or a baseline server on a free loopback port.
pub(crate) struct ServerProcess {
    pub(crate) process: RoleProcess,
    pub(crate) url: String,
    _state: tempfile::TempDir,
}

impl ServerProcess {
    pub(crate) fn start(plan: &Plan, kind: Server) -> Result<Self, String> {
        Self::start_with(plan, kind, None)
    }

    /// Starts a server; a hub with `config` (TOML) when given.
    pub(crate) fn start_with(
        plan: &Plan,
        kind: Server,
        config: Option<&str>,
    ) -> Result<Self, String> {
        let state = tempfile::tempdir().map_err(|e| e.to_string())?;
        let quiet = [("RUST_LOG", "error")];
        let mut process = match kind {
            Server::Hub => {
                let mut serve = Command::new(&plan.hub);
                serve
                    .args(["serve", "--listen", "127.0.0.1:0", "--http", "off"])
                    .arg("--state-dir")
                    .arg(state.path());
                if let Some(config) = config {
                    let path = state.path().join("config.toml");
                    std::fs::write(&path, config).map_err(|e| e.to_string())?;
                    serve.arg("--config").arg(path);
                }
                RoleProcess::spawn(&mut serve, &quiet)?
            }
            Server::Baseline => RoleProcess::role(&["baseline".into()], &quiet)?,
        };
        let line = process.line(Duration::from_secs(30))?;
        let address = line
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("unexpected first line `{line}`"))?;
        Ok(Self {
            url: format!("http://{address}"),
            process,
            _state: state,
        })
    }

    pub(crate) fn stat(&self) -> Result<ProcessStat, String> {
        ProcessStat::read(self.process.pid()).ok_or_else(|| "the server exited".to_owned())
    }
}

pub(crate) fn load(url: &str, streams: usize, rate: Option<f64>) -> Result<RoleProcess, String> {
    load_named(url, "bench", streams, rate)
}

/// [`load`] with worker ids `PREFIX-N`.
pub(crate) fn load_named(
    url: &str,
    prefix: &str,
    streams: usize,
    rate: Option<f64>,
) -> Result<RoleProcess, String> {
    load_with(url, prefix, streams, rate, false)
}

/// [`load`] of events named after 100 buckets, for subscribers that each match one.
pub(crate) fn load_buckets(
    url: &str,
    streams: usize,
    rate: Option<f64>,
) -> Result<RoleProcess, String> {
    load_with(url, "bench", streams, rate, true)
}

fn load_with(
    url: &str,
    prefix: &str,
    streams: usize,
    rate: Option<f64>,
    buckets: bool,
) -> Result<RoleProcess, String> {
    let mut args = vec![
        "load".into(),
        "--target".into(),
        url.into(),
        "--streams".into(),
        streams.to_string(),
        "--prefix".into(),
        prefix.into(),
    ];
    if let Some(rate) = rate {
        args.extend(["--rate".into(), rate.to_string()]);
    }
    if buckets {
        args.push("--buckets".into());
    }
    let mut process = RoleProcess::role(&args, &[])?;
    process.ready(Duration::from_secs(120))?;
    Ok(process)
}

/// `workers` worker-library workers emitting `rate` events per second each.
pub(crate) fn library_workers(url: &str, workers: usize, rate: f64) -> Result<RoleProcess, String> {
    let args = vec![
        "workers".into(),
        "--target".into(),
        url.into(),
        "--workers".into(),
        workers.to_string(),
        "--rate".into(),
        rate.to_string(),
    ];
    let mut process = RoleProcess::role(&args, &[("RUST_LOG", "error")])?;
    process.ready(Duration::from_secs(120))?;
    Ok(process)
}

pub(crate) fn subscribers(
    url: &str,
    count: usize,
    buckets: bool,
    latency: bool,
) -> Result<RoleProcess, String> {
    subscribers_of(url, count, buckets, latency, &[], 0)
}

/// [`subscribers`] to the events of `workers` only (all when empty), each subscription asking
/// the server for `linger_ms`.
pub(crate) fn subscribers_of(
    url: &str,
    count: usize,
    buckets: bool,
    latency: bool,
    workers: &[String],
    linger_ms: u32,
) -> Result<RoleProcess, String> {
    let mut args = vec![
        "subscribe".into(),
        "--target".into(),
        url.into(),
        "--subscribers".into(),
        count.to_string(),
        "--linger-ms".into(),
        linger_ms.to_string(),
    ];
    for worker in workers {
        args.extend(["--worker".into(), worker.clone()]);
    }
    if buckets {
        args.push("--buckets".into());
    }
    if latency {
        args.push("--latency".into());
    }
    let mut process = RoleProcess::role(&args, &[])?;
    process.ready(Duration::from_secs(60))?;
    Ok(process)
}

pub(crate) fn idle(url: &str, workers: usize) -> Result<RoleProcess, String> {
    idle_named(url, "bench", workers, Duration::ZERO)
}

/// [`idle`] with worker ids `PREFIX-N`, each sending a numbered event `every` (zero: never).
pub(crate) fn idle_named(
    url: &str,
    prefix: &str,
    workers: usize,
    every: Duration,
) -> Result<RoleProcess, String> {
    let args = vec![
        "idle".into(),
        "--target".into(),
        url.into(),
        "--workers".into(),
        workers.to_string(),
        "--prefix".into(),
        prefix.into(),
        "--every-ms".into(),
        every.as_millis().to_string(),
    ];
    let mut process = RoleProcess::role(&args, &[])?;
    process.ready(Duration::from_secs(300))?;
    Ok(process)
}

/// Subscriptions that are never read.
pub(crate) fn stalled(url: &str, count: usize) -> Result<RoleProcess, String> {
    let args = vec![
        "stall".into(),
        "--target".into(),
        url.into(),
        "--subscribers".into(),
        count.to_string(),
    ];
    let mut process = RoleProcess::role(&args, &[])?;
    process.ready(Duration::from_secs(60))?;
    Ok(process)
}

pub(crate) fn number(report: &Json, key: &str) -> Result<f64, String> {
    report[key]
        .as_f64()
        .ok_or_else(|| format!("no `{key}` in {report}"))
}
