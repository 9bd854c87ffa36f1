//! CPU and memory of the app the sidecar runs, from `/proc` (Linux).

use std::time::Instant;

use crate::{emitter::Emitter, value::Value};

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    /// CPU time used since the previous reading, as a percentage of one core (200 = two cores).
    pub cpu_percent: f64,
    pub rss_bytes: u64,
    pub threads: u64,
}

/// What `/proc` says about a process right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStat {
    /// User plus system CPU time since the process started.
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub threads: u64,
}

impl ProcessStat {
    /// `None` once the process is gone (or on a system without `/proc`).
    pub fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let (ticks, threads) = parse_stat(&stat)?;
        Some(Self {
            cpu_seconds: ticks as f64 / ticks_per_second(),
            rss_bytes: parse_rss_bytes(&status)?,
            threads,
        })
    }
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100) as f64
}

/// Turns successive readings into CPU percentages.
#[derive(Debug)]
pub struct ProcessSampler {
    pid: u32,
    previous: Option<(Instant, f64)>,
}

impl ProcessSampler {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            previous: None,
        }
    }

    /// A reading, or `None` once the process is gone (or on a system without `/proc`).
    pub fn sample(&mut self) -> Option<ProcessSample> {
        let stat = ProcessStat::read(self.pid)?;
        let now = Instant::now();
        let cpu_percent = match self.previous.replace((now, stat.cpu_seconds)) {
            Some((then, before)) => {
                let seconds = now.duration_since(then).as_secs_f64();
                if seconds > 0.0 {
                    (stat.cpu_seconds - before).max(0.0) / seconds * 100.0
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        Some(ProcessSample {
            cpu_percent,
            rss_bytes: stat.rss_bytes,
            threads: stat.threads,
        })
    }
}

/// User plus system ticks, and the thread count, from `/proc/PID/stat`. The command name in
/// parentheses may contain spaces, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // After the name: state is field 3 of the file, utime 14, stime 15, num_threads 20.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(20)?))
}

fn parse_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Emits a reading as `process.metrics`.
pub fn emit(emitter: &Emitter, pid: u32, sample: &ProcessSample) {
    let pid = pid.to_string();
    emitter.emit(
        "process.metrics",
        &[
            (
                "cpu_percent",
                Value::Float((sample.cpu_percent * 10.0).round() / 10.0),
            ),
            ("rss_bytes", Value::from(sample.rss_bytes)),
            ("threads", Value::from(sample.threads)),
        ],
        &[("pid", &pid)],
        None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let stat = "4242 (my app (v2)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 100000 500";
        assert_eq!(parse_stat(stat), Some((300, 7)));
        assert_eq!(
            parse_rss_bytes("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
    }

    #[test]
    fn reads_this_very_process() {
        let mut sampler = ProcessSampler::new(std::process::id());
        let first = sampler.sample().expect("our own /proc entry");
        assert!(first.rss_bytes > 1024 * 1024 && first.threads >= 1);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let second = sampler.sample().expect("still here");
        assert!(second.cpu_percent >= 0.0);
        assert!(ProcessSampler::new(u32::MAX).sample().is_none());
    }
}
