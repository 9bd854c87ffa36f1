//! Control: how long a sampling change takes from the operator's call until the worker
//! acknowledged it, with 1,000 connected workers, for one worker and for all of them; the
//! baseline is a unary call.

use std::time::{Duration, Instant};

use bridge::{
    client::HubClient,
    command::{Change, Selector},
};
use bridge_proto::{sampling::Rate, v1};

use crate::{
    Plan, Section,
    process::{Server, ServerProcess, idle_named},
    progress,
    report::{Figure, percentile},
};

pub(crate) async fn control(plan: &Plan) -> Result<Vec<Figure>, String> {
    let workers = plan.control_workers;
    progress(&format!(
        "control with {workers} connected workers sending an event a second each, hub"
    ));
    let hub = ServerProcess::start(plan, Server::Hub)?;
    // Trickling, numbered events: the hub's receipts for them must never hold a change back.
    let _idle = idle_named(&hub.url, "bench", workers, Duration::from_secs(1))?;
    let mut client = HubClient::connect(&hub.url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let mut round_trips = Vec::with_capacity(plan.control_rounds);
    let mut unacknowledged = Vec::with_capacity(plan.control_rounds);
    for i in 0..plan.control_rounds * 2 {
        let id = format!("bench-{}", rand::random_range(0..workers));
        let rate = Rate::new(if i % 2 == 0 { 0.5 } else { 1.0 }).map_err(|e| e.to_string())?;
        // Every other pair of changes does not wait: what the hub itself takes to save and
        // send a change.
        let wait = i % 4 < 2;
        let started = Instant::now();
        let response = client
            .update_control(
                &Selector::Worker(id.clone()),
                &Change::Sampling {
                    rate,
                    patterns: vec![],
                },
                if wait {
                    Duration::from_secs(5)
                } else {
                    Duration::ZERO
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        if !wait {
            unacknowledged.push(elapsed);
            continue;
        }
        round_trips.push(elapsed);
        if !response.targets.first().is_some_and(|t| t.applied) {
            return Err(format!("{id} did not acknowledge"));
        }
    }
    let started = Instant::now();
    let response = client
        .update_control(
            &Selector::All,
            &Change::Sampling {
                rate: Rate::new(0.9).map_err(|e| e.to_string())?,
                patterns: vec![],
            },
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| e.to_string())?;
    let all_ms = started.elapsed().as_secs_f64() * 1000.0;
    let applied = response.targets.iter().filter(|t| t.applied).count();
    if applied != workers {
        return Err(format!(
            "only {applied} of {workers} workers acknowledged the change to --all"
        ));
    }

    progress("control round trip, baseline (a unary call)");
    let base = ServerProcess::start(plan, Server::Baseline)?;
    let mut base_client = HubClient::connect(&base.url, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let mut base_trips = Vec::with_capacity(plan.control_rounds);
    for _ in 0..plan.control_rounds {
        let started = Instant::now();
        base_client
            .raw()
            .get_control(v1::GetControlRequest::default())
            .await
            .map_err(|e| e.to_string())?;
        base_trips.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let p99 = percentile(&round_trips, 0.99);
    Ok(vec![
        Figure::new(
            Section::Control,
            format!("sample one worker -> acknowledged p50, {workers} connected"),
            "ms",
            percentile(&round_trips, 0.5),
        )
        .baseline(percentile(&base_trips, 0.5)),
        Figure::new(
            Section::Control,
            format!("sample one worker -> acknowledged p99, {workers} connected"),
            "ms",
            p99,
        )
        .baseline(percentile(&base_trips, 0.99))
        .target("<= 2 ms", p99 <= 2.0),
        Figure::new(
            Section::Control,
            "  of which saved and sent by the hub (not waiting), p50",
            "ms",
            percentile(&unacknowledged, 0.5),
        )
        .baseline(percentile(&base_trips, 0.5)),
        Figure::new(
            Section::Control,
            format!("sample --all -> acknowledged by all {workers}"),
            "ms",
            all_ms,
        )
        .target("<= 50 ms", all_ms <= 50.0),
    ])
}
