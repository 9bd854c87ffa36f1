//! `--only cluster`: two hubs sharing a nats-server on this machine, next to one hub
//! measured the same way in the same invocation (the baseline column).
//!
//! Load goes to hub A and subscribers and operators use hub B, so every figure crosses NATS:
//! A publishes batches of events, B matches and delivers them; a command on B is written to
//! the key-value bucket, A pushes it to its worker and B gathers A's acknowledgement.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bridge::{
    client::HubClient,
    command::{Change, Selector},
};
use bridge_proto::sampling::Rate;

use worker::process::ProcessStat;

use crate::{
    Plan, Section,
    fanout::{Fanout, probe_fanout},
    latency::{Latency, probe_latency},
    process::{Server, ServerProcess, idle_named, load, number, subscribers},
    progress, repeat,
    report::{Figure, median, percentile},
};

/// Event rate of the latency figure: well under what either set-up sustains.
const LATENCY_RATE: f64 = 10_000.0;
/// Event rate of the cost figure.
const COST_RATE: f64 = 100_000.0;
/// Workers that take control changes, each sending an event a second.
const CONTROL_WORKERS: usize = 100;

/// A nats-server with JetStream on a free loopback port; killed when dropped.
struct Nats {
    child: Child,
    url: String,
    _store: tempfile::TempDir,
}

impl Nats {
    /// `Ok(None)` when nats-server is not installed.
    fn start() -> Result<Option<Self>, String> {
        let store = tempfile::tempdir().map_err(|e| e.to_string())?;
        let spawned = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("start nats-server: {e}")),
        };
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (found, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end, so that the server never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, address)) = line.split_once("Listening for client connections on ")
                {
                    let _ = found.send(address.trim().to_owned());
                }
            }
        });
        let address = listening
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "nats-server did not start listening within 20 s")?;
        Ok(Some(Self {
            child,
            url: format!("nats://{address}"),
            _store: store,
        }))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two clustered hubs on one nats-server.
struct Pair {
    a: ServerProcess,
    b: ServerProcess,
    // Dropped last: the hubs go first.
    nats: Nats,
}

impl Pair {
    fn start(plan: &Plan, nats: Nats) -> Result<Self, String> {
        let config = |node: &str| {
            format!(
                "[cluster]\nnats_url = \"{}\"\nnode = \"{node}\"\n",
                nats.url
            )
        };
        Ok(Self {
            a: ServerProcess::start_with(plan, Server::Hub, Some(&config("bench-a")))?,
            b: ServerProcess::start_with(plan, Server::Hub, Some(&config("bench-b")))?,
            nats,
        })
    }
}

pub(crate) async fn cluster(plan: &Plan, asked: bool) -> Result<Vec<Figure>, String> {
    let start = || -> Result<Option<Pair>, String> {
        Nats::start()?
            .map(|nats| Pair::start(plan, nats))
            .transpose()
    };
    if start()?.is_none() {
        if asked {
            return Err(
                "the cluster section needs nats-server on PATH (Debian: apt install nats-server)"
                    .into(),
            );
        }
        progress("cluster: skipped, no nats-server on PATH");
        return Ok(Vec::new());
    }
    let mut figures = Vec::new();

    let label = "fan-out across hubs, 1 subscriber matching all";
    let two = repeat(plan, &format!("{label}, two hubs"), || {
        let pair = start()?.ok_or("nats-server went away")?;
        probe_fanout(plan, &pair.a.url, &pair.b.url, 1, false, 0)
    })?;
    let one = repeat(plan, &format!("{label}, one hub"), || {
        let hub = ServerProcess::start(plan, Server::Hub)?;
        probe_fanout(plan, &hub.url, &hub.url, 1, false, 0)
    })?;
    let rate = |runs: &[Fanout]| median(runs.iter().map(|r| r.deliveries_per_second).collect());
    figures.push(
        Figure::new(Section::Cluster, label, "deliveries/s", rate(&two)).baseline(rate(&one)),
    );

    let label =
        format!("CPU-s per million events delivered at {COST_RATE:.0}/s (hubs + nats-server)");
    let two = repeat(plan, &format!("{label}, two hubs"), || {
        let pair = start()?.ok_or("nats-server went away")?;
        let pids = [
            pair.a.process.pid(),
            pair.b.process.pid(),
            pair.nats.child.id(),
        ];
        cost(plan, &pair.a.url, &pair.b.url, &pids)
    })?;
    let one = repeat(plan, &format!("{label}, one hub"), || {
        let hub = ServerProcess::start(plan, Server::Hub)?;
        cost(plan, &hub.url, &hub.url, &[hub.process.pid()])
    })?;
    figures.push(Figure::new(Section::Cluster, label, "CPU-s", median(two)).baseline(median(one)));

    let label = format!("event -> subscriber latency at {LATENCY_RATE:.0} events/s");
    let two = repeat(plan, &format!("{label}, two hubs"), || {
        let pair = start()?.ok_or("nats-server went away")?;
        probe_latency(plan, &pair.a.url, &pair.b.url, LATENCY_RATE)
    })?;
    let one = repeat(plan, &format!("{label}, one hub"), || {
        let hub = ServerProcess::start(plan, Server::Hub)?;
        probe_latency(plan, &hub.url, &hub.url, LATENCY_RATE)
    })?;
    for (name, pick) in [
        ("p50", (|l: &Latency| l.p50_us) as fn(&Latency) -> f64),
        ("p99", |l: &Latency| l.p99_us),
    ] {
        figures.push(
            Figure::new(
                Section::Cluster,
                format!("{label}, {name}"),
                "us",
                median(two.iter().map(pick).collect()),
            )
            .baseline(median(one.iter().map(pick).collect())),
        );
    }

    progress(&format!(
        "cluster: control through hub B for {CONTROL_WORKERS} workers on hub A, and on one hub"
    ));
    let pair = start()?.ok_or("nats-server went away")?;
    let two = control_round_trips(plan, &pair.a.url, &pair.b.url).await?;
    drop(pair);
    let hub = ServerProcess::start(plan, Server::Hub)?;
    let one = control_round_trips(plan, &hub.url, &hub.url).await?;
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        figures.push(
            Figure::new(
                Section::Cluster,
                format!("through the other hub: sample one worker -> acknowledged {name}"),
                "ms",
                percentile(&two.one, q),
            )
            .baseline(percentile(&one.one, q)),
        );
    }
    figures.push(
        Figure::new(
            Section::Cluster,
            format!("through the other hub: sample --all -> acknowledged by all {CONTROL_WORKERS}"),
            "ms",
            median(two.all),
        )
        .baseline(median(one.all)),
    );
    Ok(figures)
}

/// CPU seconds of `pids` per million events delivered, at [`COST_RATE`] into `load_url` with
/// one subscriber on `subs_url`.
fn cost(plan: &Plan, load_url: &str, subs_url: &str, pids: &[u32]) -> Result<f64, String> {
    let mut subs = subscribers(subs_url, 1, false, false)?;
    let _load = load(load_url, 4, Some(COST_RATE))?;
    std::thread::sleep(plan.warmup);
    let cpu = || -> Result<f64, String> {
        pids.iter()
            .map(|pid| {
                ProcessStat::read(*pid)
                    .map(|s| s.cpu_seconds)
                    .ok_or_else(|| format!("process {pid} exited"))
            })
            .sum()
    };
    let (delivered0, cpu0) = (number(&subs.mark()?, "deliveries")?, cpu()?);
    std::thread::sleep(plan.window);
    let (delivered1, cpu1) = (number(&subs.mark()?, "deliveries")?, cpu()?);
    Ok((cpu1 - cpu0) / (delivered1 - delivered0).max(1.0) * 1e6)
}

struct RoundTrips {
    /// Milliseconds per change to one worker, until acknowledged.
    one: Vec<f64>,
    /// Milliseconds per change to every worker, until all acknowledged.
    all: Vec<f64>,
}

/// Control changes sent to `ask_url` for workers connected to `workers_url`, each waiting for
/// the acknowledgements.
async fn control_round_trips(
    plan: &Plan,
    workers_url: &str,
    ask_url: &str,
) -> Result<RoundTrips, String> {
    let _workers = idle_named(
        workers_url,
        "bench",
        CONTROL_WORKERS,
        Duration::from_secs(1),
    )?;
    let mut client = HubClient::connect(ask_url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    // The asked hub must see every worker (through the other hub, in a cluster) first.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let workers = client.list_workers(None).await.map_err(|e| e.to_string())?;
        if workers.iter().filter(|w| w.connected).count() >= CONTROL_WORKERS {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{ask_url} saw {} of {CONTROL_WORKERS} workers after 60 s",
                workers.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sampling = |i: usize| -> Result<Change, String> {
        Ok(Change::Sampling {
            rate: Rate::new(if i.is_multiple_of(2) { 0.5 } else { 1.0 })
                .map_err(|e| e.to_string())?,
            patterns: vec![],
        })
    };
    let mut trips = RoundTrips {
        one: Vec::with_capacity(plan.control_rounds),
        all: Vec::new(),
    };
    for i in 0..plan.control_rounds {
        let id = format!("bench-{}", rand::random_range(0..CONTROL_WORKERS));
        let started = Instant::now();
        let response = client
            .update_control(
                &Selector::Worker(id.clone()),
                &sampling(i)?,
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| e.to_string())?;
        trips.one.push(started.elapsed().as_secs_f64() * 1000.0);
        if !response.targets.first().is_some_and(|t| t.applied) {
            return Err(format!("{id} did not acknowledge through {ask_url}"));
        }
    }
    for i in 0..plan.runs.max(3) {
        let started = Instant::now();
        let response = client
            .update_control(&Selector::All, &sampling(i)?, Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
        trips.all.push(started.elapsed().as_secs_f64() * 1000.0);
        let applied = response.targets.iter().filter(|t| t.applied).count();
        if applied != CONTROL_WORKERS {
            return Err(format!(
                "only {applied} of {CONTROL_WORKERS} workers acknowledged --all through {ask_url}"
            ));
        }
    }
    Ok(trips)
}
