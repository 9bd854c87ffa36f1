//! `bridge subscribe`: tail live events, filtered on the hub.

use std::io::Write;

use bridge::{client::HubClient, command::Selector, outputs::subscribers::MAX_LINGER};
use bridge_proto::{
    condition::{Condition, MAX_CONDITIONS},
    labels::LabelSet,
    pattern::Pattern,
    trace::TraceId,
    v1,
};

use super::{
    Failure, HubTarget, Outcome, connect,
    render::{self, Format},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Event patterns: `*` matches one token, `>` the rest (e.g. 'inference.>'). None: every
    /// event.
    patterns: Vec<String>,
    /// Only events from this worker (repeat for several).
    #[arg(long = "worker", value_name = "ID")]
    workers: Vec<String>,
    /// Only events from workers in this pool.
    #[arg(long)]
    pool: Option<String>,
    /// Only events of this trace (32 hex digits, as in a `traceparent` or the `trace_id` this
    /// command prints): one request, across every worker.
    #[arg(long, value_name = "ID")]
    trace: Option<String>,
    /// Only events whose metadata meets this: KEY=VALUE (has KEY, exactly VALUE) or
    /// KEY!=VALUE (no KEY, or another value). Repeat: all must hold. Checked at the hub.
    #[arg(long = "where", value_name = "CONDITION")]
    conditions: Vec<String>,
    /// Only events from workers with this label: KEY=VALUE. Repeat: all must match. In cluster
    /// mode, workers on every hub.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Output format; json prints one object per line.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Let the hub hold events up to this long (e.g. 20ms, at most 1s) to send them together:
    /// less CPU for the hub and this command at high rates, at up to this much added latency.
    /// An event after a quiet spell still comes at once.
    #[arg(long, value_name = "DURATION")]
    linger: Option<String>,
}

/// `--linger` as the request's `linger_ms`.
fn linger_ms(text: &str) -> Result<u32, Failure> {
    let invalid = |why: &str| Failure::invalid(format!("--linger {text}: {why}"));
    let linger = humantime::parse_duration(text.trim())
        .map_err(|_| invalid("not a duration such as 20ms or 1s"))?;
    if linger > MAX_LINGER {
        return Err(invalid(&format!(
            "at most {}",
            humantime::format_duration(MAX_LINGER)
        )));
    }
    if linger.subsec_nanos() % 1_000_000 != 0 {
        return Err(invalid("whole milliseconds only"));
    }
    Ok(u32::try_from(linger.as_millis()).expect("at most MAX_LINGER"))
}

pub async fn run(hub: &HubTarget, args: Args) -> Outcome {
    for pattern in &args.patterns {
        Pattern::parse(pattern).map_err(Failure::invalid)?;
    }
    let trace_id = match &args.trace {
        Some(id) => TraceId::parse_any_case(id.trim())
            .map_err(|e| Failure::invalid(format!("--trace {id}: {e}")))?
            .as_bytes()
            .to_vec(),
        None => Vec::new(),
    };
    let conditions = args
        .conditions
        .iter()
        .map(|text| {
            Condition::parse(text)
                .map(|c| v1::MetadataCondition::from(&c))
                .map_err(|e| Failure::invalid(format!("--where {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if conditions.len() > MAX_CONDITIONS {
        return Err(Failure::invalid(format!(
            "{} --where conditions; at most {MAX_CONDITIONS}",
            conditions.len()
        )));
    }
    let worker_labels = match args.labels.as_slice() {
        [] => Default::default(),
        items => LabelSet::parse_items(items.iter().map(String::as_str))
            .map_err(|e| Failure::invalid(format!("--label {e}")))?
            .labels()
            .clone()
            .into_iter()
            .collect(),
    };
    let linger_ms = args
        .linger
        .as_deref()
        .map(linger_ms)
        .transpose()?
        .unwrap_or(0);
    if args.limit == Some(0) {
        return Ok(());
    }
    let mut client = connect(hub).await?;
    warn_about_unknown_workers(&mut client, &args.workers).await;
    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            patterns: args.patterns,
            worker_ids: args.workers,
            pool: args.pool.unwrap_or_default(),
            trace_id,
            metadata_conditions: conditions,
            worker_labels,
            linger_ms,
        })
        .await?;
    let mut events = 0u64;
    loop {
        let item = match stream.message().await {
            Ok(Some(response)) => response.item,
            Ok(None) => {
                return Err(Failure::new(
                    3,
                    format!("the hub at {hub} ended the subscription"),
                ));
            }
            Err(status) => return Err(client.explain(status).await.into()),
        };
        let line = match (&item, args.format) {
            (Some(v1::subscribe_response::Item::Event(delivery)), Format::Json) => {
                render::delivery_json(delivery).to_string()
            }
            (Some(v1::subscribe_response::Item::Event(delivery)), Format::Text) => {
                render::delivery_text(delivery)
            }
            (Some(v1::subscribe_response::Item::Lagged(lag)), Format::Json) => {
                render::lag_json(lag.skipped).to_string()
            }
            (Some(v1::subscribe_response::Item::Lagged(lag)), Format::Text) => {
                render::lag_text(lag.skipped)
            }
            (None, _) => continue,
        };
        if writeln!(std::io::stdout().lock(), "{line}").is_err() {
            // The reader went away (`| head`): that is a normal way to stop.
            return Ok(());
        }
        if matches!(item, Some(v1::subscribe_response::Item::Event(_))) {
            events += 1;
            if args.limit.is_some_and(|limit| events >= limit) {
                return Ok(());
            }
        }
    }
}

/// A `--worker` the hub does not know is most often a typo, which would otherwise look like a
/// quiet worker: say so on stderr, and subscribe anyway (the worker may be about to connect).
async fn warn_about_unknown_workers(client: &mut HubClient, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    for id in ids {
        // Only a hint: a failure here shows again, with its reason, when subscribing.
        let selector = Selector::Worker(id.clone());
        if client
            .list_workers(Some(&selector))
            .await
            .is_ok_and(|known| known.is_empty())
        {
            eprintln!(
                "warning: no worker `{}` is known to the hub (`bridge workers` lists them); waiting for it to connect",
                render::printable(id)
            );
        }
    }
}
