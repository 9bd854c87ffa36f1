//! The task that steers levels under a target event rate (`bridge sample --target 500/s`).
//!
//! Every [`ADJUST_EVERY`] it counts the events delivered since the last look from the
//! connected workers whose sampling rate each such level decides (their rate is the level's),
//! and lets `control::target::next_rate` choose the level's next rate, written as a change of
//! the level like an operator's (new version, saved, pushed). A worker first seen in a period
//! counts from the next one. In cluster mode one hub steers, the one with the smallest node
//! name among those up (see `cluster::control::steers`); it counts the workers of every hub.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use crate::{
    cluster,
    control::target::{ADJUST_EVERY, next_rate},
    hub::{Hub, selects_info},
};

/// Runs until the hub shuts down.
pub async fn run(hub: Hub) {
    let mut tick = tokio::time::interval(ADJUST_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Counts::default();
    loop {
        tokio::select! {
            () = hub.shutdown_token().cancelled() => return,
            _ = tick.tick() => {}
        }
        last = adjust(&hub, last).await;
    }
}

/// Events delivered per worker (by hub and id) at one moment.
#[derive(Debug, Default)]
struct Counts {
    at: Option<Instant>,
    delivered: HashMap<(String, String), u64>,
}

/// One period: adjusts every level under a target; returns the counts to compare with next.
async fn adjust(hub: &Hub, last: Counts) -> Counts {
    let levels = hub.control().target_levels();
    let steering = hub
        .cluster()
        .is_none_or(|link| cluster::control::steers(link));
    if levels.is_empty() || !steering {
        return Counts::default();
    }
    let workers = hub.list_workers(None).await.workers;
    let now = Instant::now();
    let connected: Vec<_> = workers.iter().filter(|w| w.connected).collect();
    let counts = Counts {
        at: Some(now),
        delivered: connected
            .iter()
            .map(|w| ((w.hub.clone(), w.id.clone()), w.events_delivered))
            .collect(),
    };
    let Some(elapsed) = last.at.map(|at| now.duration_since(at)) else {
        return counts;
    };
    if elapsed < Duration::from_millis(100) {
        return last;
    }
    for (selector, goal, rate) in levels {
        let mut governed = 0usize;
        let mut delivered = 0u64;
        for worker in &connected {
            let decided = worker
                .control
                .as_ref()
                .is_some_and(|state| state.sampling_rate == rate.get());
            if !decided || !selects_info(&selector, worker) {
                continue;
            }
            let key = (worker.hub.clone(), worker.id.clone());
            // A counter that went back is a new worker process: it counts from the next period.
            if let Some(before) = last.delivered.get(&key)
                && let Some(since) = worker.events_delivered.checked_sub(*before)
            {
                governed += 1;
                delivered += since;
            }
        }
        if governed == 0 {
            continue;
        }
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let per_second = delivered as f64 / elapsed.as_secs_f64();
        let Some(next) = next_rate(rate, per_second, goal) else {
            continue;
        };
        match hub.steer(&selector, rate, next).await {
            Ok(Some(version)) => debug!(
                selector = %selector,
                target = %goal,
                delivered_per_second = per_second,
                from = %rate,
                to = %next,
                control.version = version,
                "target rate: sampling rate adjusted"
            ),
            Ok(None) => {}
            Err(error) => {
                warn!(selector = %selector, %error, "target rate: sampling rate not adjusted");
            }
        }
    }
    counts
}
