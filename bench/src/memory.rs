//! Memory: what the server's RSS grows by per idle connected worker, with 10,000 connected.

use std::time::Duration;

use crate::{
    Plan, Section,
    process::{Server, ServerProcess, idle},
    repeat,
    report::{Figure, median},
};

fn measure_memory(plan: &Plan, kind: Server, workers: usize) -> Result<f64, String> {
    let server = ServerProcess::start(plan, kind)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = server.stat()?.rss_bytes;
    let _idle = idle(&server.url, workers)?;
    std::thread::sleep(Duration::from_secs(1));
    let after = server.stat()?.rss_bytes;
    Ok(after.saturating_sub(before) as f64 / workers as f64)
}

pub(crate) fn memory(plan: &Plan) -> Result<Vec<Figure>, String> {
    let workers = plan.idle_workers;
    let hub = repeat(
        plan,
        &format!("memory with {workers} idle workers, hub"),
        || measure_memory(plan, Server::Hub, workers),
    )?;
    let base = repeat(
        plan,
        &format!("memory with {workers} idle workers, baseline"),
        || measure_memory(plan, Server::Baseline, workers),
    )?;
    let per_worker = median(hub) / 1024.0;
    Ok(vec![
        Figure::new(
            Section::Memory,
            format!("hub memory per idle worker, {workers} connected"),
            "KiB",
            per_worker,
        )
        .baseline(median(base) / 1024.0)
        .target("<= 32 KiB", per_worker <= 32.0),
    ])
}
