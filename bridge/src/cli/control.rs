//! `bridge sample | toggle | filter | reset | control`: change and read control state.

use std::time::Duration;

use bridge::{
    client::HubClient,
    command::{Change, Selector},
    control::target::EventRate,
};
use bridge_proto::{labels::LabelSet, pattern::Pattern, sampling::Rate, v1};

use super::{
    Failure, HubTarget, Outcome, connect,
    render::{self, Format},
};

/// Which workers: a WORKER argument, `--pool NAME`, `--label KEY=VALUE` or `--all`.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Every worker in this pool, including workers that join it later.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["all", "labels"])]
    pool: Option<String>,
    /// Every worker with this label, including workers that join later with it. Repeat: all
    /// must match.
    #[arg(long = "label", value_name = "KEY=VALUE", conflicts_with = "all")]
    labels: Vec<String>,
    /// Every worker, including workers that join later.
    #[arg(long)]
    all: bool,
}

impl Target {
    /// Whether a flag names the workers (so no WORKER argument may).
    fn broad(&self) -> bool {
        self.pool.is_some() || self.all || !self.labels.is_empty()
    }
}

/// How a change waits for acknowledgements, and how its outcome is printed.
#[derive(Debug, clap::Args)]
pub struct Wait {
    /// Do not wait for workers to acknowledge.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for acknowledgements (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output format; json prints one object: the change, its version, each worker reached
    /// and whether it applied it, and the rules that still decide some of its events.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Undo the change after this long (e.g. 90s, 15m, 2h, 1h30m; up to 30 days): each setting
    /// it makes returns to what it was. Not for reset.
    // Read as text, so that a bad value gets one line of ours rather than clap's usage.
    #[arg(long = "for", value_name = "DURATION", allow_hyphen_values = true)]
    lasting: Option<String>,
}

/// `--for`'s value: a duration of at least a millisecond and at most 30 days.
fn parse_lasting(text: &str, change: &Change) -> Result<Duration, Failure> {
    let lasting = humantime::parse_duration(text.trim()).map_err(|error| {
        Failure::invalid(format!(
            "--for `{}`: not a duration ({error}; say 90s, 15m, 2h or 1h30m)",
            render::printable(text)
        ))
    })?;
    bridge::command::check_lasting("--for", lasting, change).map_err(Failure::invalid)?;
    if lasting < Duration::from_millis(1) {
        return Err(Failure::invalid(format!(
            "--for {text}: a timed change must last at least 1ms"
        )));
    }
    Ok(lasting)
}

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// `WORKER RATE`, or `RATE` with --pool or --all. RATE is from 0 to 1 (0.05 keeps 5 %).
    /// With --target, only `WORKER` (or none with --pool, --label or --all).
    #[arg(value_name = "[WORKER] RATE", num_args = 1..=2, required_unless_present = "goal", allow_negative_numbers = true)]
    args: Vec<String>,
    /// Only for events matching this pattern (repeatable); otherwise the default rate.
    #[arg(long = "pattern", value_name = "P")]
    patterns: Vec<String>,
    /// Instead of a RATE, a goal for the events delivered from these workers (`500/s`,
    /// `600/m`): the hub keeps choosing the level's rate to approach it, until a fixed
    /// rate is set there.
    // Read as text, so that a bad value gets one line of ours rather than clap's usage.
    #[arg(
        long = "target",
        id = "goal",
        value_name = "EVENTS/s",
        conflicts_with = "patterns",
        allow_hyphen_values = true
    )]
    goal: Option<String>,
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
    if !target.labels.is_empty() {
        if worker.is_some() {
            return Err(Failure::invalid(
                "name either a WORKER or --label, not both",
            ));
        }
        return LabelSet::parse_items(target.labels.iter().map(String::as_str))
            .map(Selector::Labels)
            .map_err(|e| Failure::invalid(format!("--label {e}")));
    }
    match (worker, &target.pool, target.all) {
        (Some(id), None, false) => Ok(Selector::Worker(id)),
        (None, Some(pool), false) => Ok(Selector::Pool(pool.clone())),
        (None, None, true) => Ok(Selector::All),
        (None, None, false) => Err(Failure::invalid(
            "name a WORKER, or use --pool NAME, --label KEY=VALUE or --all",
        )),
        _ => Err(Failure::invalid(
            "name either a WORKER or --pool/--label/--all, not both",
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
    let broad = target.broad();
    let mut args = args.into_iter();
    let (worker, value) = match (args.next(), args.next(), broad) {
        (Some(worker), Some(value), false) => (Some(worker), value),
        (Some(value), None, true) => (None, value),
        (Some(_), Some(_), true) => {
            return Err(Failure::invalid(
                "with --pool, --label or --all, give only the value, not a WORKER",
            ));
        }
        (Some(worker), None, false) if !is_value(&worker) => {
            return Err(Failure::invalid(format!(
                "{value_name} is missing: give it after the worker ({worker} {value_name})"
            )));
        }
        _ => {
            return Err(Failure::invalid(
                "name a WORKER (or use --pool NAME, --label KEY=VALUE or --all)",
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
    if let Some(goal) = &args.goal {
        let goal: EventRate = goal
            .parse()
            .map_err(|e| Failure::invalid(format!("--{e}")))?;
        let mut positional = args.args.into_iter();
        let worker = positional.next();
        let is_rate = worker.as_deref().is_some_and(|w| w.parse::<f64>().is_ok());
        if positional.next().is_some() || is_rate {
            return Err(Failure::invalid(
                "--target replaces the RATE: give only a WORKER (or --pool, --label or --all)",
            ));
        }
        let selector = selector(worker, &args.target)?;
        let change = Change::Target {
            goal,
            start: Rate::ALL,
        };
        return apply(hub, selector, change, &args.wait).await;
    }
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
    let lasting = wait
        .lasting
        .as_deref()
        .map(|text| parse_lasting(text, &change))
        .transpose()?;
    let mut client = connect(hub).await?;
    let wait_for = if wait.no_wait {
        Duration::ZERO
    } else {
        wait.timeout
    };
    let response = client
        .update_control_for(&selector, &change, wait_for, lasting)
        .await?;
    if let Some(warning) = render::unanswered_warning(
        &response.unanswered_hubs,
        "the change is stored in the cluster and their workers get it, but their acknowledgements are missing below",
    ) {
        eprintln!("{warning}");
    }
    let kept = match &change {
        Change::Sampling { patterns, .. } => rules_still_deciding(&mut client, &selector, patterns)
            .await
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let keeping = match &change {
        Change::Reset => levels_keeping_settings(&mut client, &selector)
            .await
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let late = late_workers(&response, wait);
    match wait.format {
        Format::Json => {
            let mut object = change_json(&selector, &change, &response, wait, &late, &kept);
            if let (Change::Reset, serde_json::Value::Object(fields)) = (&change, &mut object) {
                fields.insert("levels_keeping_settings".into(), keeping.clone().into());
            }
            println!("{object}");
        }
        Format::Text => {
            report(&selector, &change, &response, wait);
            if let Some(at) = expires_at(&response) {
                println!(
                    "{change}: reverts in {} (at {})",
                    humantime::format_duration(round_to_seconds(
                        at.duration_since(std::time::SystemTime::now())
                            .unwrap_or_default()
                    )),
                    humantime::format_rfc3339_seconds(at),
                );
            }
            for rule in &kept {
                eprintln!("note: {}", rule.text(&change));
            }
            for level in &keeping {
                let to = if level.starts_with("pool ") || level.starts_with("labels ") {
                    "its workers"
                } else {
                    "it"
                };
                eprintln!(
                    "note: {level} keeps settings of its own, which still apply to {to} \
                     (`bridge reset {}` forgets them)",
                    reset_arguments(level)
                );
            }
        }
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

/// The workers that acknowledge control but had not applied the change when the wait ended.
fn late_workers(response: &v1::UpdateControlResponse, wait: &Wait) -> Vec<String> {
    if wait.no_wait {
        return Vec::new();
    }
    response
        .targets
        .iter()
        .filter(|t| t.acknowledges && !t.applied)
        .map(|t| t.worker_id.clone())
        .collect()
}

/// A sampling rule, at some level, that a change left in force.
#[derive(Debug, PartialEq)]
struct KeptRule {
    /// `global`, `pool NAME` or `worker ID`.
    level: String,
    pattern: String,
    rate: f64,
}

impl KeptRule {
    fn text(&self, change: &Change) -> String {
        let why = match change {
            Change::Sampling { patterns, .. } if patterns.is_empty() => {
                "a matching rule wins over the default rate, whatever its level"
            }
            _ => "the most specific matching rule decides, whatever its level",
        };
        format!(
            "{} keeps rule {} {}, which still decides the events it matches ({why})",
            self.level, self.pattern, self.rate
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "level": self.level,
            "pattern": self.pattern,
            "sampling_rate": self.rate,
        })
    }
}

/// The sampling rules, at any level that applies to the workers `selector` addresses, that
/// still decide some events after a sampling change for `patterns` (none: the default rate).
///
/// Levels combine setting by setting (the newest value of each wins), and a rule is a setting
/// of its own pattern: the change replaces the rules for the same patterns everywhere, but a
/// rule for another pattern that matches some of the same events keeps deciding them when it is
/// the more specific, and always over a default rate. An operator who ran `bridge sample --all
/// 1.0` over an older `inference.*` rule of a pool is told so here. Best effort: `None` when
/// the hub cannot say.
async fn rules_still_deciding(
    client: &mut HubClient,
    selector: &Selector,
    patterns: &[Pattern],
) -> Option<Vec<KeptRule>> {
    let workers = client.list_workers(Some(selector)).await.ok()?;
    let mut layers = Vec::new();
    // Each level's rules that are in force: a rule another level set anew for the same
    // pattern is not.
    let mut add = |response: v1::GetControlResponse, pool: Option<&str>, worker: Option<&str>| {
        let effective = response.effective.unwrap_or_default().rules;
        let labels = response
            .labels
            .into_iter()
            .map(|level| (Some(label_level_name(&level)), level.layer));
        let levels = [
            (Some("global".to_owned()), response.global),
            (pool.map(|p| format!("pool {p}")), response.pool),
        ]
        .into_iter()
        .chain(labels)
        .chain([(worker.map(|w| format!("worker {w}")), response.worker)]);
        for (level, layer) in levels {
            if let (Some(level), Some(layer)) = (level, layer) {
                let rules = layer
                    .rules
                    .into_iter()
                    .filter(|rule| effective.contains(rule));
                layers.extend(rules.map(|rule| (level.clone(), rule)));
            }
        }
    };
    match selector {
        Selector::Worker(_) => {}
        Selector::Pool(pool) => add(client.get_control(selector).await.ok()?, Some(pool), None),
        Selector::All | Selector::Labels(_) => {
            add(client.get_control(selector).await.ok()?, None, None);
        }
    }
    for worker in &workers {
        // A worker with no rule in force has none at any level: no need to ask.
        if worker.control.as_ref().is_none_or(|c| c.rules.is_empty()) {
            continue;
        }
        let response = client
            .get_control(&Selector::Worker(worker.id.clone()))
            .await
            .ok()?;
        let pool = (!worker.pool.is_empty()).then_some(worker.pool.as_str());
        add(response, pool, Some(&worker.id));
    }
    let mut kept: Vec<KeptRule> = Vec::new();
    for (level, rule) in layers {
        let Ok(pattern) = Pattern::parse(&rule.pattern) else {
            continue;
        };
        let decides = patterns.is_empty()
            || patterns.iter().any(|changed| {
                changed.as_str() != pattern.as_str()
                    && overlap(changed, &pattern)
                    && pattern.specificity_cmp(changed) == std::cmp::Ordering::Less
            });
        let replaced = patterns.iter().any(|p| p.as_str() == pattern.as_str());
        let rule = KeptRule {
            level,
            pattern: rule.pattern,
            rate: rule.sampling_rate,
        };
        if decides && !replaced && !kept.contains(&rule) {
            kept.push(rule);
        }
    }
    Some(kept)
}

/// Most workers whose own levels a reset's note looks up (one call each).
const MAX_LEVELS_LOOKED_UP: usize = 64;

/// After a reset of a pool or of the global level, the narrower levels under it that keep
/// settings of their own (`pool P`, `worker W`): a reset forgets one level's settings, and the
/// levels below it keep theirs. Workers whose effective state differs from the level's are
/// looked up first (they surely have some), then the others (a setting equal to what it
/// inherits still outlives the reset), at most [`MAX_LEVELS_LOOKED_UP`] in all. Best effort:
/// `None` when the hub cannot say.
async fn levels_keeping_settings(
    client: &mut HubClient,
    selector: &Selector,
) -> Option<Vec<String>> {
    if matches!(selector, Selector::Worker(_)) {
        return Some(Vec::new());
    }
    let unversioned = |state: Option<v1::ControlState>| {
        state.map(|state| v1::ControlState {
            version: 0,
            ..state
        })
    };
    let level = unversioned(client.get_control(selector).await.ok()?.effective);
    let workers = client.list_workers(Some(selector)).await.ok()?;
    let mut levels: Vec<String> = Vec::new();
    let (differing, alike): (Vec<_>, Vec<_>) = workers
        .into_iter()
        .partition(|worker| unversioned(worker.control.clone()) != level);
    for worker in differing
        .into_iter()
        .chain(alike)
        .take(MAX_LEVELS_LOOKED_UP)
    {
        let own = client
            .get_control(&Selector::Worker(worker.id.clone()))
            .await
            .ok()?;
        let pool_level =
            matches!(selector, Selector::All) && own.pool.as_ref().is_some_and(has_settings);
        // Label levels win over a pool's and the global level; between two label levels, the
        // one after the reset one (more labels, or the same number and later text).
        let reset_set = match selector {
            Selector::Labels(set) => Some(set),
            _ => None,
        };
        let label_levels = own.labels.iter().filter_map(|level| {
            let set = LabelSet::new(level.labels.clone().into_iter().collect()).ok()?;
            let narrower = reset_set.is_none_or(|reset| set > *reset);
            (narrower && level.layer.as_ref().is_some_and(has_settings))
                .then(|| label_level_name(level))
        });
        let found = [pool_level.then(|| format!("pool {}", worker.pool))]
            .into_iter()
            .chain(label_levels.map(Some))
            .chain([own
                .worker
                .as_ref()
                .is_some_and(has_settings)
                .then(|| format!("worker {}", worker.id))]);
        for level in found.flatten() {
            if !levels.contains(&level) {
                levels.push(level);
            }
        }
    }
    levels.sort();
    Some(levels)
}

fn has_settings(layer: &v1::ControlLayer) -> bool {
    layer.enabled.is_some()
        || layer.sampling_rate.is_some()
        || !layer.rules.is_empty()
        || layer.filter.is_some()
        || layer.target_events_per_second.is_some()
}

/// `labels zone=a,rack=3`: how the notes name a label level.
fn label_level_name(level: &v1::LabelLayer) -> String {
    match LabelSet::new(level.labels.clone().into_iter().collect()) {
        Ok(set) => format!("labels {set}"),
        Err(_) => "labels ?".to_owned(),
    }
}

/// `bridge reset`'s arguments for a level named as [`levels_keeping_settings`] names them.
fn reset_arguments(level: &str) -> String {
    match level.split_once(' ') {
        Some(("pool", pool)) => format!("--pool {pool}"),
        Some(("labels", text)) => match LabelSet::parse_canonical(text) {
            Ok(set) => set
                .labels()
                .iter()
                .map(|(key, value)| format!("--label {}", shell_word(&format!("{key}={value}"))))
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => level.to_owned(),
        },
        Some((_, worker)) => worker.to_owned(),
        None => level.to_owned(),
    }
}

/// Whether some event name matches both patterns (`*` one token, `>` one or more at the end).
fn overlap(a: &Pattern, b: &Pattern) -> bool {
    let (mut a, mut b) = (a.as_str().split('.'), b.as_str().split('.'));
    loop {
        match (a.next(), b.next()) {
            (None, None) | (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == y || x == "*" || y == "*" => {}
            _ => return false,
        }
    }
}

/// A word as a POSIX shell reads it back: as it is when it is plain, else in single quotes.
fn shell_word(word: &str) -> String {
    if word
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.=,/:@%+".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn selector_json(selector: &Selector) -> serde_json::Value {
    match selector {
        Selector::Labels(set) => serde_json::json!({ "labels": set.labels() }),
        Selector::Worker(id) => serde_json::json!({ "worker": id }),
        Selector::Pool(pool) => serde_json::json!({ "pool": pool }),
        Selector::All => serde_json::json!({ "all": true }),
    }
}

/// `--format json` of a change: the HTTP API's answer to the same change (`version`,
/// `targets`, `unanswered_hubs`) with what was asked and what came of it.
fn change_json(
    selector: &Selector,
    change: &Change,
    response: &v1::UpdateControlResponse,
    wait: &Wait,
    late: &[String],
    kept: &[KeptRule],
) -> serde_json::Value {
    let mut object = render::update_json(response);
    if let serde_json::Value::Object(fields) = &mut object {
        fields.insert("selector".into(), selector_json(selector));
        fields.insert("change".into(), change.to_string().into());
        fields.insert(
            "waited_ms".into(),
            (!wait.no_wait)
                .then(|| u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX))
                .into(),
        );
        fields.insert("not_acknowledged".into(), late.into());
        fields.insert(
            "expires_in_ms".into(),
            expires_at(response)
                .map(|at| {
                    let left = at.duration_since(std::time::SystemTime::now());
                    u64::try_from(left.unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
                })
                .into(),
        );
        fields.insert(
            "rules_still_deciding".into(),
            kept.iter().map(KeptRule::json).collect(),
        );
    }
    object
}

fn report(selector: &Selector, change: &Change, response: &v1::UpdateControlResponse, wait: &Wait) {
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
                Selector::Labels(labels) => format!(
                    "no worker labelled {labels} is connected; workers that join with these labels get it"
                ),
                Selector::All => "no worker is connected; workers that connect get it".into(),
            }
        );
        return;
    }
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

/// When a timed change reverts, by the hub's clock.
fn expires_at(response: &v1::UpdateControlResponse) -> Option<std::time::SystemTime> {
    (response.expires_at_ms != 0)
        .then(|| std::time::UNIX_EPOCH + Duration::from_millis(response.expires_at_ms))
}

/// A duration to show a person: whole seconds, or milliseconds under a second.
pub fn round_to_seconds(duration: Duration) -> Duration {
    if duration < Duration::from_secs(1) {
        Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    } else {
        Duration::from_secs(duration.as_secs_f64().round() as u64)
    }
}

fn millis(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_takes_a_duration_up_to_30_days_and_refuses_the_rest_in_one_line() {
        let toggle = Change::Toggle(false);
        for (text, secs) in [
            ("90s", 90),
            ("15m", 900),
            ("2h", 7200),
            ("1h30m", 5400),
            ("30d", 2_592_000),
        ] {
            let parsed =
                parse_lasting(text, &toggle).unwrap_or_else(|f| panic!("{text}: {}", f.message));
            assert_eq!(parsed, Duration::from_secs(secs), "{text}");
        }
        for (text, says) in [
            ("0", "must last more than 0"),
            ("0s", "must last more than 0"),
            ("-5s", "not a duration"),
            ("soon", "not a duration"),
            ("400d", "longer than the 30 days"),
            ("31d", "longer than the 30 days"),
            ("500us", "at least 1ms"),
            ("", "not a duration"),
        ] {
            let failure = parse_lasting(text, &toggle).expect_err(text);
            assert_eq!(failure.code, 2);
            assert!(
                failure.message.contains(says),
                "{text}: {}",
                failure.message
            );
            assert!(!failure.message.contains('\n'), "{text}: one line");
        }
        let failure = parse_lasting("1m", &Change::Reset).expect_err("reset");
        assert!(
            failure.message.contains("a reset cannot be timed"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn patterns_overlap_when_some_name_matches_both() {
        let p = |s: &str| Pattern::parse(s).expect("pattern");
        for (a, b) in [
            ("inference.*", "inference.>"),
            ("inference.*", "*.stop"),
            ("a.>", "a.b.c"),
            (">", "x"),
            ("a.b", "a.b"),
        ] {
            assert!(overlap(&p(a), &p(b)), "{a} {b}");
            assert!(overlap(&p(b), &p(a)), "{b} {a}");
        }
        for (a, b) in [
            ("inference.*", "gpu.>"),
            ("a.*", "a.b.c"),
            ("a.>", "a"),
            ("a.b", "a.c"),
        ] {
            assert!(!overlap(&p(a), &p(b)), "{a} {b}");
            assert!(!overlap(&p(b), &p(a)), "{b} {a}");
        }
    }
}
