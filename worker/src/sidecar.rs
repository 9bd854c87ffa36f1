//! The sidecar: runs next to (or around) a model server in any language and relays its
//! telemetry to the hub.
//!
//! With a command it runs the app as a child: stdout and stdin pass straight through, stderr
//! line by line, minus `TELEMETRY:{json}` lines, which become events (a malformed one is counted
//! and passed through). SIGINT and SIGTERM are forwarded to the app, and the sidecar exits with
//! the app's exit code (128 + signal if it was killed). Without a command it serves only GPU
//! metrics and the local endpoint until signalled. Either way it reports GPU metrics (NVML) and
//! the app's CPU and memory every interval, and drains its buffer to the hub before exiting.

use std::{ffi::OsString, process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStderr, Command},
    signal::unix::{SignalKind, signal},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    emitter::{Emitter, Value},
    gpu::{self, FakeGpus, GpuSource, NvmlSource},
    link::{Link, LinkOptions},
    local::{self, LocalAddress},
    process::{self, ProcessSampler},
    simulate, telemetry_line,
};

/// Everything the sidecar needs to run.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    pub link: LinkOptions,
    /// The app to run; empty: run standalone.
    pub command: Vec<OsString>,
    pub metrics_interval: Duration,
    pub local: Option<LocalAddress>,
    /// Use this many fake GPUs instead of NVML (tests and demos).
    pub fake_gpus: Option<u32>,
    /// How long to wait for the hub to confirm buffered events when exiting.
    pub drain_timeout: Duration,
    /// Without a command: also emit simulated inference traffic.
    pub simulate: Option<simulate::Simulation>,
}

/// Runs the sidecar to completion; returns the process exit code.
pub async fn run(mut options: SidecarOptions) -> Result<u8, String> {
    let gpus = open_gpus(options.fake_gpus);
    options.link.gpu = match (&gpus, &options.simulate) {
        (Some(gpus), _) => gpus.describe(),
        // Its `gpu.metrics` events would contradict a worker listed with no GPU.
        (None, Some(_)) => simulate::GPU_DESCRIPTION.to_owned(),
        (None, None) => "none".to_owned(),
    };
    let link = Link::start(options.link.clone()).map_err(|e| e.to_string())?;
    let emitter = link.emitter();
    let stop = CancellationToken::new();

    if let Some(address) = options.local.clone() {
        let (emitter, stop) = (emitter.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(error) = local::serve(emitter, address, stop).await {
                warn!(%error, "local endpoint failed");
            }
        });
    }

    let mut signals = Signals::new()?;
    let exit_code = if options.command.is_empty() {
        let metrics = tokio::spawn(report_metrics(
            emitter.clone(),
            gpus,
            None,
            options.metrics_interval,
            stop.clone(),
        ));
        let traffic = options.simulate.map(|simulation| {
            tokio::spawn(simulate::run(emitter.clone(), simulation, stop.clone()))
        });
        let signal = signals.next().await;
        info!(?signal, "stopping");
        stop.cancel();
        let _ = metrics.await;
        if let Some(traffic) = traffic {
            let _ = traffic.await;
        }
        0
    } else {
        let mut child = spawn_app(&options.command)?;
        let pid = child.id().unwrap_or(0);
        let command = options.command[0].to_string_lossy().into_owned();
        emitter.emit(
            "worker.ready",
            &[("pid", Value::from(pid))],
            &[("command", &command)],
            None,
        );
        let stderr = child
            .stderr
            .take()
            .ok_or("the app's stderr was not captured")?;
        let relay = tokio::spawn(relay_stderr(stderr, emitter.clone()));
        let metrics = tokio::spawn(report_metrics(
            emitter.clone(),
            gpus,
            Some(pid),
            options.metrics_interval,
            stop.clone(),
        ));
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.map_err(|e| format!("waiting for the app failed: {e}"))?,
                Some(signal) = signals.next() => forward(pid, signal),
            }
        };
        // Everything the app wrote before it exited is relayed before it is reported gone.
        let _ = relay.await;
        stop.cancel();
        let _ = metrics.await;
        let (code, detail) = exit_code(status);
        let mut measurements = vec![("pid", Value::from(pid)), ("exit_code", Value::from(code))];
        if let Some(signal) = status_signal(status) {
            measurements.push(("signal", Value::from(signal)));
        }
        emitter.emit("worker.exit", &measurements, &[("status", &detail)], None);
        info!(pid, %detail, "app exited");
        code
    };

    stop.cancel();
    let counters = link.close(options.drain_timeout).await;
    if counters.buffered() > 0 {
        warn!(
            lost = counters.buffered(),
            "exiting with events the hub did not confirm"
        );
    }
    Ok(exit_code)
}

fn open_gpus(fake: Option<u32>) -> Option<Box<dyn GpuSource>> {
    if let Some(count) = fake {
        return Some(Box::new(FakeGpus::new(count)));
    }
    match NvmlSource::open() {
        Ok(source) => {
            info!(gpu = %source.describe(), "GPU metrics from NVML");
            Some(Box::new(source))
        }
        Err(reason) => {
            warn!("no GPU metrics: {reason}; the worker reports no GPU and carries on");
            None
        }
    }
}

fn spawn_app(command: &[OsString]) -> Result<Child, String> {
    Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", command[0].to_string_lossy()))
}

/// Copies the app's stderr to ours byte for byte, except telemetry lines, which become events.
async fn relay_stderr(stderr: ChildStderr, emitter: Emitter) {
    let mut reader = BufReader::new(stderr);
    let mut out = tokio::io::stderr();
    let mut line = Vec::with_capacity(1024);
    let mut warned = false;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if telemetry_line::is_telemetry(&line) {
            match telemetry_line::parse(&line) {
                Ok(event) => {
                    emitter.emit_event(event);
                    continue;
                }
                Err(error) => {
                    emitter.count_parse_error();
                    if !warned {
                        warned = true;
                        warn!(%error, "malformed TELEMETRY line passed through and counted (dropped.parse_error); logged once");
                    }
                }
            }
        }
        if out.write_all(&line).await.is_err() {
            break;
        }
        let _ = out.flush().await;
    }
}

/// GPU and app metrics every `interval` until `stop`.
async fn report_metrics(
    emitter: Emitter,
    mut gpus: Option<Box<dyn GpuSource>>,
    pid: Option<u32>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut app = pid.map(ProcessSampler::new);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(source) = gpus.take() {
            // NVML calls block; keep them off the async workers.
            let (source, samples) = match tokio::task::spawn_blocking(move || {
                let mut source = source;
                let samples = source.sample();
                (source, samples)
            })
            .await
            {
                Ok(result) => result,
                Err(_) => return,
            };
            gpu::emit(&emitter, &samples);
            gpus = Some(source);
        }
        if let (Some(sampler), Some(pid)) = (app.as_mut(), pid)
            && let Some(sample) = sampler.sample()
        {
            process::emit(&emitter, pid, &sample);
        }
    }
}

/// SIGINT and SIGTERM as a stream.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, String> {
        let install = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> Option<Signal> {
        tokio::select! {
            received = self.interrupt.recv() => received.map(|()| Signal::SIGINT),
            received = self.terminate.recv() => received.map(|()| Signal::SIGTERM),
        }
    }
}

fn forward(pid: u32, signal: Signal) {
    info!(pid, ?signal, "forwarding signal to the app");
    let Ok(pid) = i32::try_from(pid) else { return };
    if let Err(error) = nix::sys::signal::kill(Pid::from_raw(pid), signal) {
        warn!(%error, ?signal, "could not forward the signal to the app");
    }
}

fn status_signal(status: std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal()
}

/// The exit code to pass on (128 + signal for a killed app) and a description.
fn exit_code(status: std::process::ExitStatus) -> (u8, String) {
    match (status.code(), status_signal(status)) {
        (Some(code), _) => (
            u8::try_from(code & 0xff).unwrap_or(1),
            format!("exited with code {code}"),
        ),
        (None, Some(signal)) => (
            u8::try_from(128 + signal).unwrap_or(255),
            format!("killed by signal {signal}"),
        ),
        (None, None) => (1, "ended without an exit code".into()),
    }
}
