//! `bridge workers`: who is connected, their rates, drops and control state.

use bridge::command::Selector;
use bridge_proto::{labels::LabelSet, v1};

use super::{
    Failure, HubTarget, Outcome, connect,
    render::{self, Format},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the workers of this pool.
    #[arg(long, value_name = "NAME", conflicts_with = "labels")]
    pool: Option<String>,
    /// Only the workers with this label: KEY=VALUE. Repeat: all must match.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Output format; json prints one array of objects.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub async fn run(hub: &HubTarget, args: Args) -> Outcome {
    let selector = match (&args.pool, args.labels.as_slice()) {
        (Some(pool), _) => Some(Selector::Pool(pool.clone())),
        (None, []) => None,
        (None, items) => Some(Selector::Labels(
            LabelSet::parse_items(items.iter().map(String::as_str))
                .map_err(|e| Failure::invalid(format!("--label {e}")))?,
        )),
    };
    let mut client = connect(hub).await?;
    let v1::ListWorkersResponse {
        workers,
        unanswered_hubs,
    } = client.list_workers_response(selector.as_ref()).await?;
    if let Some(warning) =
        render::unanswered_warning(&unanswered_hubs, "their workers are not listed")
    {
        eprintln!("{warning}");
    }
    match args.format {
        Format::Json => {
            let array: Vec<_> = workers.iter().map(render::worker_json).collect();
            println!("{}", serde_json::Value::Array(array));
        }
        Format::Text if workers.is_empty() => match &selector {
            Some(Selector::Pool(pool)) => {
                println!("no workers of pool `{pool}` known to the hub at {hub}");
            }
            Some(Selector::Labels(labels)) => {
                println!("no workers labelled {labels} known to the hub at {hub}");
            }
            _ => println!("no workers known to the hub at {hub}"),
        },
        Format::Text => print!("{}", render::workers_table(&workers)),
    }
    Ok(())
}
