//! `bridge demo`: the whole loop on one machine, on real sockets, in a few seconds.
//!
//! A hub on a free loopback port, three simulated model servers ([`simulated`]: `worker
//! --simulate` processes) streaming inference events, a live tail through `Subscribe`, and
//! halfway through a sampling change for one worker made through the same admin call as
//! `bridge sample`; the per-second rates show it take effect.

mod simulated;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bridge::{
    Config, Hub,
    client::HubClient,
    command::{Change, Selector},
};
use bridge_proto::{
    protocol::{events, inference},
    sampling::Rate,
    v1,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::simulated::Workers;
use super::{Failure, Outcome, render, serve::shutdown_signal};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to run, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 8, value_parser = clap::value_parser!(u64).range(4..=3600))]
    duration: u64,
    /// Requests per second each simulated worker serves (two events each).
    #[arg(long, default_value_t = 100.0, value_parser = positive)]
    requests_per_second: f64,
}

fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("`{text}` is not a positive number")),
    }
}

/// One of a simulated request's events (`docs/conventions.md`).
fn is_inference(name: &str) -> bool {
    [inference::START, inference::STOP, inference::EXCEPTION].contains(&name)
}

const WORKERS: [(&str, &str); 3] = [
    ("gpu-1", "llama-70b"),
    ("gpu-2", "llama-70b"),
    ("gpu-3", "mistral-7b"),
];
const TARGET: &str = "gpu-1";
const NEW_RATE: f64 = 0.1;

pub async fn run(args: Args) -> Outcome {
    let binary = simulated::worker_binary().await?;
    let mut workers = Workers::default();
    let outcome = tokio::select! {
        outcome = demo(args, &binary, &mut workers) => outcome,
        () = shutdown_signal() => Err(Failure::new(130, "interrupted")),
    };
    workers.stop().await;
    outcome
}

async fn demo(args: Args, binary: &Path, workers: &mut Workers) -> Outcome {
    let state_dir = tempfile::tempdir()
        .map_err(|e| Failure::new(1, format!("cannot create a state directory: {e}")))?;
    let mut config = Config::default();
    config.hub.state_dir = state_dir.path().to_owned();
    let hub = Hub::new(config).map_err(|e| Failure::new(1, e))?;
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| Failure::new(1, format!("cannot listen on loopback: {e}")))?;
    let url = format!(
        "http://{}",
        listener.local_addr().map_err(|e| Failure::new(1, e))?
    );
    let stop_hub = CancellationToken::new();
    let server = tokio::spawn(bridge::serve(
        hub,
        listener,
        stop_hub.clone().cancelled_owned(),
    ));
    println!(
        "hub listening on {url}; 3 simulated workers (`worker --simulate`), {} requests/s each\n",
        args.requests_per_second
    );

    let mut client = HubClient::connect(&url, Duration::from_secs(5)).await?;
    println!("$ bridge subscribe      (every event; the first few shown, then rates per second)");
    let tail = client.subscribe(v1::SubscribeRequest::default()).await?;
    let counts = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = tokio::spawn(read_tail(tail, counts.clone(), lines.clone()));
    // The tail is read concurrently; its lines are printed from here, so output stays in order.
    let flush = || {
        for line in std::mem::take(&mut *lines.lock().unwrap_or_else(|p| p.into_inner())) {
            println!("  {line}");
        }
    };

    for (id, model) in WORKERS {
        workers.start(binary, &url, id, model, args.requests_per_second)?;
    }
    wait_connected(&mut client, workers).await?;

    let switch_at = args.duration / 2;
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    counts.lock().unwrap_or_else(|p| p.into_inner()).clear();
    for second in 1..=args.duration {
        tick.tick().await;
        let window = std::mem::take(&mut *counts.lock().unwrap_or_else(|p| p.into_inner()));
        flush();
        let row: Vec<String> = WORKERS
            .iter()
            .map(|(id, _)| format!("{id} {:>4}/s", window.get(*id).copied().unwrap_or(0)))
            .collect();
        println!("  t={second:>2}s  inference events  {}", row.join("   "));
        let target_rate = window.get(TARGET).copied().unwrap_or(0);
        if second > 1 && second <= switch_at {
            before.push(target_rate);
        } else if second > switch_at + 1 {
            after.push(target_rate);
        }
        if second == switch_at {
            change_rate(&mut client).await?;
        }
    }

    flush();
    println!("\n$ bridge workers");
    print!(
        "{}",
        render::workers_table(&client.list_workers(None).await?)
    );

    // The workers drain to the hub before it stops, as a worker's link closes in production.
    workers.stop().await;
    stop_hub.cancel();
    let _ = server.await;
    reader.abort();
    flush();

    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let (before, after) = (mean(&before), mean(&after));
    println!(
        "\n{TARGET} went from {before:.0} to {after:.0} inference events/s after `bridge sample {TARGET} {NEW_RATE}` \
         (the others kept their rate); the demo is over."
    );
    if before > 0.0 && after > before * 0.5 {
        return Err(Failure::new(
            1,
            "the sampling change did not show in the delivered rate",
        ));
    }
    Ok(())
}

/// Waits until every simulated worker is connected and has applied its control state.
async fn wait_connected(client: &mut HubClient, workers: &mut Workers) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = client.list_workers(None).await?;
        let ready = |id: &str| {
            listed
                .iter()
                .any(|w| w.id == id && w.connected && w.applied_version.is_some())
        };
        let missing: Vec<&str> = WORKERS
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !ready(id))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(exited) = workers.exited() {
            return Err(Failure::new(1, exited));
        }
        if Instant::now() > deadline {
            return Err(Failure::new(
                3,
                format!(
                    "simulated workers did not connect within 10 s: {}",
                    missing.join(", ")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn change_rate(client: &mut HubClient) -> Outcome {
    println!("\n$ bridge sample {TARGET} {NEW_RATE}");
    let rate = Rate::new(NEW_RATE).map_err(Failure::invalid)?;
    let response = client
        .update_control(
            &Selector::Worker(TARGET.into()),
            &Change::Sampling {
                rate,
                patterns: vec![],
            },
            Duration::from_secs(2),
        )
        .await?;
    match response.targets.first() {
        Some(target) if target.applied => println!(
            "{TARGET}: sampling {NEW_RATE} applied in {:.1} ms (version {})\n",
            target.ack_latency_us as f64 / 1000.0,
            response.version
        ),
        _ => {
            return Err(Failure::new(
                5,
                format!("{TARGET} did not acknowledge the change"),
            ));
        }
    }
    Ok(())
}

/// Keeps a few events, every lifecycle event and lag notice for printing, and counts inference
/// events per worker for the rate table.
async fn read_tail(
    mut tail: tonic::Streaming<v1::SubscribeResponse>,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    lines: Arc<Mutex<Vec<String>>>,
) {
    let print = |line: String| lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    let mut shown = 0;
    let mut shown_sampled = 0;
    while let Ok(Some(response)) = tail.message().await {
        match response.item {
            Some(v1::subscribe_response::Item::Event(delivery)) => {
                let name = delivery
                    .event
                    .as_ref()
                    .map(|e| e.event_parts.join("."))
                    .unwrap_or_default();
                if is_inference(&name) {
                    *counts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(delivery.worker_id.clone())
                        .or_default() += 1;
                }
                let sampled = delivery.sampling_rate < 1.0;
                let reserved = events::is_reserved(&name);
                let show = reserved
                    || (shown < 4 && is_inference(&name))
                    || (sampled && shown_sampled < 2);
                if show {
                    shown += usize::from(!reserved);
                    shown_sampled += usize::from(sampled);
                    print(render::delivery_text(&delivery));
                }
            }
            Some(v1::subscribe_response::Item::Lagged(lag)) => {
                println!("  {}", render::lag_text(lag.skipped))
            }
            None => {}
        }
    }
}
