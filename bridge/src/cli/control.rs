//! `bridge sample | toggle | filter | reset | control`: change and read control state.

use std::time::Duration;

use bridge::command::{Change, Selector};
use bridge_proto::{pattern::Pattern, sampling::Rate, v1};

use super::{
    Failure, HubTarget, Outcome, connect,
    render::{self, Format},
};

/// Which workers: a WORKER argument, `--pool NAME` or `--all`.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Every worker in this pool, including workers that join it later.
    #[arg(long, value_name = "NAME", conflicts_with = "all")]
    pool: Option<String>,
    /// Every worker, including workers that join later.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, clap::Args)]
pub struct Wait {
    /// Do not wait for workers to acknowledge.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for acknowledgements (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// `WORKER RATE`, or `RATE` with --pool or --all. RATE is from 0 to 1 (0.05 keeps 5 %).
    #[arg(value_name = "[WORKER] RATE", num_args = 1..=2, required = true, allow_negative_numbers = true)]
    args: Vec<String>,
    /// Only for events matching this pattern (repeatable); otherwise the default rate.
    #[arg(long = "pattern", value_name = "P")]
    patterns: Vec<String>,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, clap::Args)]
pub struct ToggleArgs {
    /// `WORKER on|off`, or `on|off` with --pool or --all.
    #[arg(value_name = "[WORKER] on|off", num_args = 1..=2, required = true)]
    args: Vec<String>,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// The worker (or use --pool / --all).
    worker: Option<String>,
    /// Emit only events matching one of these patterns (repeatable).
    #[arg(long, value_name = "P")]
    allow: Vec<String>,
    /// Never emit events matching these patterns (repeatable); wins over --allow.
    #[arg(long, value_name = "P")]
    block: Vec<String>,
    /// Remove all filters at this level.
    #[arg(long, conflicts_with_all = ["allow", "block"])]
    clear: bool,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// The worker (or use --pool / --all).
    worker: Option<String>,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The worker (or use --pool / --all).
    worker: Option<String>,
    #[command(flatten)]
    target: Target,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

fn selector(worker: Option<String>, target: &Target) -> Result<Selector, Failure> {
    match (worker, &target.pool, target.all) {
        (Some(id), None, false) => Ok(Selector::Worker(id)),
        (None, Some(pool), false) => Ok(Selector::Pool(pool.clone())),
        (None, None, true) => Ok(Selector::All),
        (None, None, false) => Err(Failure::invalid(
            "name a WORKER, or use --pool NAME or --all",
        )),
        _ => Err(Failure::invalid(
            "name either a WORKER or --pool/--all, not both",
        )),
    }
}

/// Splits `[WORKER] VALUE` positionals according to the target flags. `value` names the value
/// (`RATE`) and says whether a lone argument is one, so that a missing value is reported as
/// missing rather than as a missing worker.
fn worker_and_value(
    args: Vec<String>,
    target: &Target,
    value: (&str, fn(&str) -> bool),
) -> Result<(Selector, String), Failure> {
    let (value_name, is_value) = value;
    let broad = target.pool.is_some() || target.all;
    let mut args = args.into_iter();
    let (worker, value) = match (args.next(), args.next(), broad) {
        (Some(worker), Some(value), false) => (Some(worker), value),
        (Some(value), None, true) => (None, value),
        (Some(_), Some(_), true) => {
            return Err(Failure::invalid(
                "with --pool or --all, give only the value, not a WORKER",
            ));
        }
        (Some(worker), None, false) if !is_value(&worker) => {
            return Err(Failure::invalid(format!(
                "{value_name} is missing: give it after the worker ({worker} {value_name})"
            )));
        }
        _ => {
            return Err(Failure::invalid(
                "name a WORKER (or use --pool NAME or --all)",
            ));
        }
    };
    Ok((selector(worker, target)?, value))
}

fn patterns(list: &[String]) -> Result<Vec<Pattern>, Failure> {
    list.iter()
        .map(|p| Pattern::parse(p).map_err(Failure::invalid))
        .collect()
}

pub async fn sample(hub: &HubTarget, args: SampleArgs) -> Outcome {
    let (selector, rate) = worker_and_value(
        args.args,
        &args.target,
        ("RATE", |arg| arg.parse::<f64>().is_ok()),
    )?;
    let rate: Rate = rate.parse().map_err(Failure::invalid)?;
    let change = Change::Sampling {
        rate,
        patterns: patterns(&args.patterns)?,
    };
    apply(hub, selector, change, &args.wait).await
}

pub async fn toggle(hub: &HubTarget, args: ToggleArgs) -> Outcome {
    let (selector, state) = worker_and_value(
        args.args,
        &args.target,
        ("on|off", |arg| on_off(arg).is_some()),
    )?;
    let enabled =
        on_off(&state).ok_or_else(|| Failure::invalid(format!("`{state}`: say on or off")))?;
    apply(hub, selector, Change::Toggle(enabled), &args.wait).await
}

fn on_off(word: &str) -> Option<bool> {
    match word {
        "on" | "true" | "enable" => Some(true),
        "off" | "false" | "disable" => Some(false),
        _ => None,
    }
}

pub async fn filter(hub: &HubTarget, args: FilterArgs) -> Outcome {
    let selector = selector(args.worker, &args.target)?;
    if !args.clear && args.allow.is_empty() && args.block.is_empty() {
        return Err(Failure::invalid(
            "give --allow and/or --block patterns, or --clear",
        ));
    }
    let change = Change::Filter {
        allow: patterns(&args.allow)?,
        block: patterns(&args.block)?,
    };
    apply(hub, selector, change, &args.wait).await
}

pub async fn reset(hub: &HubTarget, args: ResetArgs) -> Outcome {
    let selector = selector(args.worker, &args.target)?;
    apply(hub, selector, Change::Reset, &args.wait).await
}

pub async fn show(hub: &HubTarget, args: ShowArgs) -> Outcome {
    let selector = selector(args.worker, &args.target)?;
    let mut client = connect(hub).await?;
    let response = client.get_control(&selector).await?;
    println!("{}", render::describe_control(&response, args.format));
    Ok(())
}

async fn apply(hub: &HubTarget, selector: Selector, change: Change, wait: &Wait) -> Outcome {
    let mut client = connect(hub).await?;
    let wait_for = if wait.no_wait {
        Duration::ZERO
    } else {
        wait.timeout
    };
    let response = client.update_control(&selector, &change, wait_for).await?;
    if let Some(warning) = render::unanswered_warning(
        &response.unanswered_hubs,
        "the change is stored in the cluster and their workers get it, but their acknowledgements are missing below",
    ) {
        eprintln!("{warning}");
    }
    report(&selector, &change, &response, wait)
}

fn report(
    selector: &Selector,
    change: &Change,
    response: &v1::UpdateControlResponse,
    wait: &Wait,
) -> Outcome {
    let what = change.to_string();
    let version = response.version;
    if response.targets.is_empty() {
        println!(
            "{what}: stored as version {version}; {}",
            match selector {
                Selector::Worker(id) =>
                    format!("{id} is not connected and gets it when it reconnects"),
                Selector::Pool(pool) =>
                    format!("no worker of pool `{pool}` is connected; workers that join it get it"),
                Selector::All => "no worker is connected; workers that connect get it".into(),
            }
        );
        return Ok(());
    }
    let mut late = Vec::new();
    let many = response.targets.len() > 10;
    let (mut applied, mut plain, mut slowest) = (0, 0, 0u64);
    for target in &response.targets {
        let waited = (!wait.no_wait).then_some(wait.timeout);
        let line = target_line(target, &what, version, waited);
        if target.applied {
            applied += 1;
            slowest = slowest.max(target.ack_latency_us);
        } else if !target.acknowledges {
            plain += 1;
        } else if waited.is_some() {
            late.push(target.worker_id.clone());
        }
        if !many || !target.applied {
            println!("{line}");
        }
    }
    if many {
        println!(
            "{what} (version {version}) reached {} workers: {applied} applied (slowest {}), {plain} enforced at the hub, {} pending",
            response.targets.len(),
            millis(slowest),
            response.targets.len() - applied - plain,
        );
    }
    if late.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            5,
            format!(
                "{} worker(s) did not acknowledge in time: {}",
                late.len(),
                late.join(", ")
            ),
        ))
    }
}

/// What became of change `what` (version `version`) at one worker, after waiting `waited` for
/// its acknowledgement (`None`: not waiting).
pub fn target_line(
    target: &v1::TargetStatus,
    what: &str,
    version: u64,
    waited: Option<Duration>,
) -> String {
    let id = &target.worker_id;
    if target.applied {
        format!(
            "{id}: {what} applied in {} (version {version})",
            millis(target.ack_latency_us)
        )
    } else if !target.acknowledges {
        format!(
            "{id}: {what} takes effect at the hub (version {version}); this client does not acknowledge control, so the hub enforces it on its events"
        )
    } else if let Some(waited) = waited {
        format!(
            "{id}: did not acknowledge version {version} within {}",
            humantime::format_duration(waited)
        )
    } else {
        format!("{id}: {what} sent (version {version}); not waiting for the acknowledgement")
    }
}

fn millis(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}
