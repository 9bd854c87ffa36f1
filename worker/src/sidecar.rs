//! The sidecar: runs next to (or around) a model server in any language and relays its
//! telemetry to the hub.
//!
//! With a command it runs the app as a child: stdout and stdin pass straight through, stderr
//! line by line, minus `TELEMETRY:{json}` lines, which become events (a malformed one is counted
//! and passed through). A line is held only up to `max_line_bytes`; the rest of a longer one is
//! passed through as it arrives, so the sidecar's memory does not depend on what the app writes.
//! SIGINT and SIGTERM are forwarded to the app; an app still running `kill_grace` later, or
//! when a second signal arrives, is killed (SIGKILL), and on Linux the app is killed too if the
//! sidecar dies (parent-death signal). The sidecar exits with the app's exit code (128 + signal
//! if it was killed). Without a command it serves only GPU metrics and the local
//! endpoint until signalled. Either way it reports GPU metrics (NVML) and the app's CPU and
//! memory every interval, and drains its buffer to the hub before exiting.

use std::{ffi::OsString, num::NonZeroI32, process::Stdio, time::Duration};

use bridge_proto::sampling::Draw;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    process::Child,
    signal::unix::{SignalKind, signal},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    counters::DropReason,
    emitter::Emitter,
    gpu::{self, FakeGpus, GpuSource, NvmlSource},
    launcher,
    link::{Link, LinkOptions},
    local::{self, LocalAddress},
    process::{self, ProcessSampler},
    simulate, telemetry_line,
    value::Value,
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
    /// The most of one line of the app's stderr held at once (`worker.max_line_bytes`).
    pub max_line_bytes: usize,
    /// How long the app has to exit after a forwarded SIGTERM or SIGINT before it is killed.
    pub kill_grace: Duration,
}

/// Runs the sidecar to completion; returns the process exit code.
pub async fn run(mut options: SidecarOptions) -> Result<u8, String> {
    let gpus = open_gpus(options.fake_gpus, options.simulate.is_some());
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
        // Bound before the app starts, so that an address in use stops the sidecar at once.
        let listener = local::bind(&address).await?;
        let (emitter, stop) = (emitter.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(error) = local::serve(emitter, listener, stop).await {
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
        // Tokio knows the pid until it has reaped the child, so this is `None` only for an app
        // gone already; then nothing is signalled and the events carry no pid.
        let pid = child.id().and_then(AppPid::new);
        let pid_measurement = pid.map(|pid| ("pid", Value::from(pid.get())));
        let command = options.command[0].to_string_lossy().into_owned();
        emitter.emit(
            "worker.ready",
            pid_measurement.as_slice(),
            &[("command", &command)],
            None,
        );
        let stderr = child
            .stderr
            .take()
            .ok_or("the app's stderr was not captured")?;
        let relay = {
            let (emitter, max_line_bytes) = (emitter.clone(), options.max_line_bytes);
            tokio::spawn(async move {
                let stderr = BufReader::with_capacity(RELAY_CHUNK, stderr);
                relay_stderr(stderr, tokio::io::stderr(), &emitter, max_line_bytes).await
            })
        };
        let metrics = tokio::spawn(report_metrics(
            emitter.clone(),
            gpus,
            pid.map(AppPid::get),
            options.metrics_interval,
            stop.clone(),
        ));
        // Set by the first signal: when the app is killed unless it exited first.
        let mut kill_at: Option<tokio::time::Instant> = None;
        let status = loop {
            let grace_over = async {
                match kill_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                status = child.wait() => break status.map_err(|e| format!("waiting for the app failed: {e}"))?,
                Some(signal) = signals.next() => match (pid, kill_at) {
                    (None, _) => warn!(?signal, "not forwarded: the app's pid is unknown"),
                    (Some(pid), None) => {
                        forward(pid, signal);
                        kill_at = Some(tokio::time::Instant::now() + options.kill_grace);
                    }
                    // Asked twice: whoever asks does not want to wait.
                    (Some(pid), Some(_)) => {
                        warn!(pid = pid.get(), ?signal, "signalled again: killing the app now");
                        forward(pid, Signal::SIGKILL);
                    }
                },
                () = grace_over => {
                    kill_at = None;
                    if let Some(pid) = pid {
                        warn!(pid = pid.get(), grace = ?options.kill_grace, "the app did not exit within --kill-grace of the signal: killing it");
                        forward(pid, Signal::SIGKILL);
                    }
                }
            }
        };
        // Everything the app wrote before it exited is relayed before it is reported gone.
        let _ = relay.await;
        stop.cancel();
        let _ = metrics.await;
        let (code, detail) = exit_code(status);
        let mut measurements: Vec<_> = pid_measurement.into_iter().collect();
        measurements.push(("exit_code", Value::from(code)));
        if let Some(signal) = status_signal(status) {
            measurements.push(("signal", Value::from(signal)));
        }
        emitter.emit("worker.exit", &measurements, &[("status", &detail)], None);
        info!(pid = pid.map(AppPid::get), %detail, "app exited");
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

/// Fake devices when asked for; none for a simulated model server, which reports its one
/// simulated GPU itself (a real device's events beside it would contradict it); else NVML's.
fn open_gpus(fake: Option<u32>, simulated: bool) -> Option<Box<dyn GpuSource>> {
    if let Some(count) = fake {
        return Some(Box::new(FakeGpus::new(count)));
    }
    if simulated {
        return None;
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
    // Through the launcher, so that the app dies with the sidecar however the sidecar dies.
    launcher::command(command)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", command[0].to_string_lossy()))
}

/// How much of the app's stderr is read at a time.
const RELAY_CHUNK: usize = 64 * 1024;

/// Copies the app's stderr to `out` byte for byte, except telemetry lines, which become events.
///
/// At most `max_line_bytes` of a line (plus one read) is held. A longer line is written out as
/// it arrives instead: it is output the app wants seen, and holding it whole would let one
/// newline-less stream take all the sidecar's memory. Such a line that began as telemetry is
/// counted (`dropped.line_too_long`), since it can no longer be parsed.
async fn relay_stderr(
    mut reader: impl AsyncBufRead + Unpin,
    mut out: impl AsyncWrite + Unpin,
    emitter: &Emitter,
    max_line_bytes: usize,
) {
    let mut line = Vec::with_capacity(1024);
    // Inside a line over the cap: pass bytes through until its end.
    let mut overflowing = false;
    let mut warned_parse = false;
    let mut warned_long = false;
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let newline = chunk.iter().position(|&b| b == b'\n');
        // This line's bytes in the chunk, its line ending included.
        let taken = newline.map_or(chunk.len(), |i| i + 1);
        let content = newline.unwrap_or(chunk.len());
        if !overflowing && line.len() + content <= max_line_bytes {
            line.extend_from_slice(&chunk[..taken]);
            reader.consume(taken);
            if newline.is_some() {
                if !relay_line(&line, &mut out, emitter, &mut warned_parse).await {
                    return;
                }
                line.clear();
            }
            continue;
        }
        if !overflowing {
            // The cap exceeds the prefix, so the line's start is in hand.
            let head = line.iter().chain(&chunk[..content]);
            if head
                .take(telemetry_line::PREFIX.len())
                .eq(telemetry_line::PREFIX)
            {
                emitter.shared.counters.dropped(DropReason::LineTooLong);
                if !warned_long {
                    warned_long = true;
                    warn!(
                        max_line_bytes,
                        "TELEMETRY line longer than worker.max_line_bytes passed through and counted (dropped.line_too_long); logged once"
                    );
                }
            }
            if !write(&mut out, &line).await {
                return;
            }
            line.clear();
        }
        if !write(&mut out, &chunk[..taken]).await {
            return;
        }
        reader.consume(taken);
        overflowing = newline.is_none();
    }
    // The app ended without a final newline: its last line still counts.
    if !line.is_empty() {
        relay_line(&line, &mut out, emitter, &mut warned_parse).await;
    }
}

/// One whole line: an event if it is a well-formed telemetry line, otherwise written to `out`.
/// False when `out` is gone.
async fn relay_line(
    line: &[u8],
    out: &mut (impl AsyncWrite + Unpin),
    emitter: &Emitter,
    warned: &mut bool,
) -> bool {
    if telemetry_line::is_telemetry(line) {
        match telemetry_line::parse(line) {
            Ok(event) => {
                emitter.emit_event(event, Draw::Independent);
                return true;
            }
            Err(error) => {
                emitter.count_parse_error();
                if !*warned {
                    *warned = true;
                    warn!(%error, "malformed TELEMETRY line passed through and counted (dropped.parse_error); logged once");
                }
            }
        }
    }
    write(out, line).await
}

/// Writes and flushes, so the app's output shows as soon as it was written. False when `out`
/// is gone.
async fn write(out: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> bool {
    out.write_all(bytes).await.is_ok() && out.flush().await.is_ok()
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

/// The app's process id, as `kill(2)` may be given it: positive. A pid of 0 would signal the
/// sidecar's own process group, and one past `i32::MAX` would wrap to a negative number, a
/// process group or (-1) every process the sidecar may signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AppPid(NonZeroI32);

impl AppPid {
    fn new(pid: u32) -> Option<Self> {
        NonZeroI32::new(i32::try_from(pid).ok()?).map(Self)
    }

    fn get(self) -> u32 {
        self.0.get().unsigned_abs()
    }
}

fn forward(pid: AppPid, signal: Signal) {
    info!(pid = pid.get(), ?signal, "forwarding signal to the app");
    if let Err(error) = nix::sys::signal::kill(Pid::from_raw(pid.0.get()), signal) {
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, duplex};

    use super::*;

    /// Relays `input`, read `chunk` bytes at a time, with a cap of `max` bytes.
    async fn relay(input: &[u8], chunk: usize, max: usize) -> (Vec<u8>, Emitter) {
        let emitter = Emitter::detached(64);
        let mut out = Vec::new();
        relay_stderr(
            BufReader::with_capacity(chunk, input),
            &mut out,
            &emitter,
            max,
        )
        .await;
        (out, emitter)
    }

    /// `TELEMETRY:{"event":NAME}` padded with spaces (which the parser ignores) to `len` bytes.
    fn telemetry(name: &str, len: usize) -> Vec<u8> {
        let mut line = format!(r#"TELEMETRY:{{"event":"{name}"}}"#).into_bytes();
        line.resize(len, b' ');
        line
    }

    #[tokio::test]
    async fn lines_over_the_cap_pass_through_whole_and_lost_telemetry_is_counted() {
        let long_telemetry = telemetry("too.long", 10 << 20);
        let long_plain = vec![b'p'; 3000];
        let mut input = b"before\n".to_vec();
        for line in [
            &telemetry("at.cap", 1024)[..],
            &long_telemetry,
            &telemetry("after.long", 40),
            &long_plain,
            &telemetry("over.cap", 1025),
        ] {
            input.extend_from_slice(line);
            input.push(b'\n');
        }
        input.extend_from_slice(b"last, without a newline");
        for chunk in [7, 1000, 64 * 1024] {
            let (out, emitter) = relay(&input, chunk, 1024).await;
            let mut expected = b"before\n".to_vec();
            for line in [
                &long_telemetry[..],
                &long_plain,
                &telemetry("over.cap", 1025),
            ] {
                expected.extend_from_slice(line);
                expected.push(b'\n');
            }
            expected.extend_from_slice(b"last, without a newline");
            assert!(out == expected, "chunk {chunk}: the output differs");
            assert_eq!(
                emitter.buffered_names(),
                ["at.cap", "after.long"],
                "chunk {chunk}"
            );
            let counters = emitter.counters();
            // The plain long line was never an event: passed through, nothing lost.
            assert_eq!(counters.dropped_line_too_long, 2, "chunk {chunk}");
            assert_eq!(counters.dropped_parse_error, 0, "chunk {chunk}");
        }
    }

    /// The old relay held a line until its newline: an app writing one without end grew the
    /// sidecar without bound, and none of it reached stderr.
    #[tokio::test]
    async fn a_line_without_end_flows_through_while_it_is_written() {
        const LINE: usize = 10 << 20;
        let (mut app, stderr) = duplex(64 * 1024);
        let (out, mut ours) = duplex(64 * 1024);
        let emitter = Emitter::detached(8);
        let relay = tokio::spawn({
            let emitter = emitter.clone();
            async move { relay_stderr(BufReader::new(stderr), out, &emitter, 1 << 20).await }
        });
        let writer = tokio::spawn(async move {
            app.write_all(b"TELEMETRY:").await.expect("write");
            let block = vec![b'x'; 64 * 1024];
            for _ in 0..LINE / block.len() {
                app.write_all(&block).await.expect("write");
            }
            // Still open, and no newline.
            app
        });
        let mut relayed = vec![0; LINE + 10];
        tokio::time::timeout(Duration::from_secs(30), ours.read_exact(&mut relayed))
            .await
            .expect("the line came out before it ended")
            .expect("read");
        assert!(relayed.starts_with(b"TELEMETRY:x"));
        assert!(relayed[10..].iter().all(|&b| b == b'x'));
        assert_eq!(emitter.counters().dropped_line_too_long, 1);

        let mut app = writer.await.expect("writer");
        app.write_all(b"xyz\nTELEMETRY:{\"event\":\"next\"}\n")
            .await
            .expect("write");
        drop(app);
        relay.await.expect("relay");
        let mut rest = Vec::new();
        ours.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"xyz\n");
        assert_eq!(emitter.buffered_names(), ["next"]);
    }

    #[test]
    fn only_a_positive_pid_is_ever_signalled() {
        // kill(0, ..) is the sidecar's own process group; past i32::MAX a pid wraps negative,
        // and kill(-1, ..) is every process.
        assert_eq!(AppPid::new(0), None);
        assert_eq!(AppPid::new(u32::MAX), None);
        assert_eq!(AppPid::new(1 << 31), None);
        assert_eq!(AppPid::new(1).map(AppPid::get), Some(1));
        assert_eq!(AppPid::new(4242).map(AppPid::get), Some(4242));
        let max = u32::try_from(i32::MAX).expect("fits");
        assert_eq!(AppPid::new(max).map(AppPid::get), Some(max));
    }

    #[test]
    fn a_signal_reaches_the_app_by_its_pid() {
        use std::os::unix::process::ExitStatusExt;
        let mut app = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        forward(AppPid::new(app.id()).expect("a pid"), Signal::SIGTERM);
        let status = app.wait().expect("wait");
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
    }
}
