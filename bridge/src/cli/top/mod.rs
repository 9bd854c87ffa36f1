//! `bridge top`: a live terminal view of the workers, refreshed from `ListWorkers`, with keys
//! to sort, filter, and change the selected worker's sampling rate or toggle it through the
//! same admin RPC as `bridge sample` / `bridge toggle`.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use bridge::{
    client::HubClient,
    command::{Change, Selector},
};
use bridge_proto::{
    protocol::{counters, gpu},
    sampling::Rate,
    v1::{self, subscribe_response::Item, telemetry_value::Value},
};
use futures_util::StreamExt;
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style, Stylize},
    text::Line,
    widgets::{Row, Table, TableState},
};
use tokio::sync::mpsc;

use super::{Failure, HubTarget, Outcome, connect, control::target_line};

/// How long a change from the view waits for the worker's acknowledgement.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// Samples of events/s kept per worker for its sparkline.
const HISTORY: usize = 24;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How often to refresh (e.g. 500ms, 2s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Only workers in this pool.
    #[arg(long)]
    pool: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortKey {
    Id,
    Pool,
    Rate,
    Drops,
}

impl SortKey {
    fn next(self) -> Self {
        match self {
            Self::Id => Self::Pool,
            Self::Pool => Self::Rate,
            Self::Rate => Self::Drops,
            Self::Drops => Self::Id,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Id => "id",
            Self::Pool => "pool",
            Self::Rate => "events/s",
            Self::Drops => "drops",
        }
    }
}

/// What the bottom line is collecting keystrokes for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Prompt {
    Filter,
    /// A sampling rate for this worker.
    Rate(String),
}

#[derive(Debug)]
struct View {
    hub: String,
    workers: Vec<v1::WorkerInfo>,
    history: HashMap<String, VecDeque<f64>>,
    gpu_utilization: HashMap<String, i64>,
    sort: SortKey,
    filter: String,
    prompt: Option<(Prompt, String)>,
    table: TableState,
    /// The outcome of the last command, or why the last refresh failed.
    status: String,
}

impl View {
    fn new(hub: String) -> Self {
        Self {
            hub,
            workers: Vec::new(),
            history: HashMap::new(),
            gpu_utilization: HashMap::new(),
            sort: SortKey::Id,
            filter: String::new(),
            prompt: None,
            table: TableState::default().with_selected(Some(0)),
            status: "q quit  ↑↓ select  s sort  / filter  r sampling rate  t toggle".into(),
        }
    }

    fn refreshed(&mut self, workers: Vec<v1::WorkerInfo>) {
        for worker in &workers {
            let history = self.history.entry(worker.id.clone()).or_default();
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(worker.events_per_second);
        }
        let listed: std::collections::HashSet<&str> =
            workers.iter().map(|w| w.id.as_str()).collect();
        self.history.retain(|id, _| listed.contains(id.as_str()));
        self.workers = workers;
    }

    /// The workers shown, filtered and sorted.
    fn visible(&self) -> Vec<&v1::WorkerInfo> {
        let mut shown: Vec<&v1::WorkerInfo> = self
            .workers
            .iter()
            .filter(|w| {
                self.filter.is_empty()
                    || w.id.contains(&self.filter)
                    || w.pool.contains(&self.filter)
            })
            .collect();
        match self.sort {
            SortKey::Id => shown.sort_by(|a, b| a.id.cmp(&b.id)),
            SortKey::Pool => shown.sort_by(|a, b| (&a.pool, &a.id).cmp(&(&b.pool, &b.id))),
            SortKey::Rate => {
                shown.sort_by(|a, b| b.events_per_second.total_cmp(&a.events_per_second))
            }
            SortKey::Drops => shown.sort_by_key(|w| std::cmp::Reverse(drops(w))),
        }
        shown
    }

    fn selected(&self) -> Option<v1::WorkerInfo> {
        let index = self.table.selected()?;
        self.visible().get(index).map(|w| (*w).clone())
    }
}

fn drops(worker: &v1::WorkerInfo) -> u64 {
    let worker_side: u64 = worker
        .worker_counters
        .iter()
        .filter(|(k, _)| k.starts_with(counters::DROPPED_PREFIX))
        .map(|(_, v)| v)
        .sum();
    worker_side + worker.hub_drops.values().sum::<u64>() + worker.missing_events
}

fn sparkline(history: Option<&VecDeque<f64>>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let Some(history) = history else {
        return String::new();
    };
    let top = history.iter().copied().fold(0.0, f64::max);
    history
        .iter()
        .map(|v| {
            if top <= 0.0 {
                BARS[0]
            } else {
                // Truncation to a bar index is the point.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let index = ((v / top) * 7.0).round() as usize;
                BARS[index.min(7)]
            }
        })
        .collect()
}

/// `0.25 applied`, `0.5 (applied v3)`, `1 at hub`: the desired sampling rate and whether the
/// worker has applied it.
fn sampling_cell(worker: &v1::WorkerInfo) -> String {
    let control = worker.control.clone().unwrap_or_default();
    let mut rate = format!("{}", control.sampling_rate);
    if !control.rules.is_empty() {
        rate.push_str(&format!(" +{} rules", control.rules.len()));
    }
    let state = if !worker.acknowledges {
        "at hub".to_owned()
    } else {
        match worker.applied_version {
            Some(applied) if applied >= worker.desired_version => "applied".to_owned(),
            Some(applied) => format!("pending (applied v{applied})"),
            None => "pending".to_owned(),
        }
    };
    format!("{rate} {state}")
}

fn draw(frame: &mut Frame, view: &mut View) {
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let connected = view.workers.iter().filter(|w| w.connected).count();
    let total_rate: f64 = view.workers.iter().map(|w| w.events_per_second).sum();
    let mut title = format!(
        "bridge top  {}  workers {connected} connected / {} known  {total_rate:.1} events/s  sort: {}",
        view.hub,
        view.workers.len(),
        view.sort.name()
    );
    if !view.filter.is_empty() {
        title.push_str(&format!("  filter: {}", view.filter));
    }
    frame.render_widget(Line::from(title).bold(), header);

    let visible = view.visible();
    // Which hub each worker streams to matters only in cluster mode.
    let clustered = visible.iter().any(|w| !w.hub.is_empty());
    let rows: Vec<Row> = visible
        .into_iter()
        .map(|w| {
            let enabled = w.control.as_ref().is_none_or(|c| c.enabled);
            let gpu = match view.gpu_utilization.get(&w.id) {
                Some(percent) => format!("{percent}%"),
                None if w.gpu.is_empty() || w.gpu == "none" => "-".into(),
                None => w.gpu.clone(),
            };
            let mut cells = vec![
                w.id.clone(),
                if w.pool.is_empty() {
                    "-".into()
                } else {
                    w.pool.clone()
                },
                if w.connected { "up" } else { "gone" }.to_owned(),
                format!("{:.1}", w.events_per_second),
                sparkline(view.history.get(&w.id)),
                drops(w).to_string(),
                sampling_cell(w),
                if enabled { "on" } else { "off" }.to_owned(),
                gpu,
            ];
            if clustered {
                cells.insert(2, w.hub.clone());
            }
            let row = Row::new(cells);
            if w.connected {
                row
            } else {
                row.style(Style::new().add_modifier(Modifier::DIM))
            }
        })
        .collect();
    let mut widths = vec![
        Constraint::Min(12),
        Constraint::Min(8),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(u16::try_from(HISTORY).unwrap_or(24)),
        Constraint::Length(8),
        Constraint::Min(24),
        Constraint::Length(7),
        Constraint::Min(6),
    ];
    let mut header = vec![
        "WORKER", "POOL", "STATUS", "EV/S", "HISTORY", "DROPS", "SAMPLING", "ENABLED", "GPU",
    ];
    if clustered {
        widths.insert(2, Constraint::Min(8));
        header.insert(2, "HUB");
    }
    let table = Table::new(rows, widths)
        .header(
            Row::new(header)
                .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)),
        )
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .column_spacing(2);
    frame.render_stateful_widget(table, body, &mut view.table);

    let bottom = match &view.prompt {
        Some((Prompt::Filter, text)) => format!("filter (id or pool): {text}▏"),
        Some((Prompt::Rate(id), text)) => format!("sampling rate for {id} (0 to 1): {text}▏"),
        None => view.status.clone(),
    };
    frame.render_widget(Line::from(bottom), footer);
}

/// What a key press asks for.
enum Action {
    Nothing,
    Quit,
    Send { id: String, change: Change },
}

fn on_key(view: &mut View, key: KeyEvent) -> Action {
    if key.kind != KeyEventKind::Press {
        return Action::Nothing;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        return Action::Quit;
    }
    if let Some((prompt, mut text)) = view.prompt.take() {
        match key.code {
            KeyCode::Esc => {}
            KeyCode::Enter => match prompt {
                Prompt::Filter => view.filter = text,
                Prompt::Rate(id) => match text
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| ())
                    .and_then(|r| Rate::new(r).map_err(|_| ()))
                {
                    Ok(rate) => {
                        view.status = format!("{id}: asking for sampling {rate}…");
                        return Action::Send {
                            id,
                            change: Change::Sampling {
                                rate,
                                patterns: vec![],
                            },
                        };
                    }
                    Err(()) => {
                        view.status = format!(
                            "`{}` is not a sampling rate: give a number from 0 to 1",
                            text.trim()
                        );
                    }
                },
            },
            KeyCode::Backspace => {
                text.pop();
                view.prompt = Some((prompt, text));
            }
            KeyCode::Char(c) => {
                text.push(c);
                view.prompt = Some((prompt, text));
            }
            _ => view.prompt = Some((prompt, text)),
        }
        return Action::Nothing;
    }
    let shown = view.visible().len();
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
        KeyCode::Down | KeyCode::Char('j') => {
            let next = view.table.selected().map_or(0, |i| i + 1);
            view.table.select(Some(next.min(shown.saturating_sub(1))));
        }
        KeyCode::Up | KeyCode::Char('k') => {
            let previous = view.table.selected().map_or(0, |i| i.saturating_sub(1));
            view.table.select(Some(previous));
        }
        KeyCode::Char('s') => view.sort = view.sort.next(),
        KeyCode::Char('/') => view.prompt = Some((Prompt::Filter, view.filter.clone())),
        KeyCode::Char('r') => match view.selected() {
            Some(worker) => view.prompt = Some((Prompt::Rate(worker.id), String::new())),
            None => view.status = "no worker selected".into(),
        },
        KeyCode::Char('t') => match view.selected() {
            Some(worker) => {
                let enabled = worker.control.as_ref().is_none_or(|c| c.enabled);
                view.status = format!(
                    "{}: asking for telemetry {}…",
                    worker.id,
                    if enabled { "off" } else { "on" }
                );
                return Action::Send {
                    id: worker.id,
                    change: Change::Toggle(!enabled),
                };
            }
            None => view.status = "no worker selected".into(),
        },
        _ => {}
    }
    Action::Nothing
}

/// Changes one worker and says what became of it, in the words `bridge sample` uses.
async fn send(mut client: HubClient, id: String, change: Change) -> String {
    let what = change.to_string();
    match client
        .update_control(&Selector::Worker(id.clone()), &change, ACK_WAIT)
        .await
    {
        Ok(response) => match response.targets.first() {
            Some(target) => target_line(target, &what, response.version, Some(ACK_WAIT)),
            None => format!(
                "{what}: stored as version {}; {id} is not connected and gets it when it reconnects",
                response.version
            ),
        },
        Err(error) => format!("{id}: {}", Failure::from(error).message),
    }
}

/// Follows `gpu.metrics` events for each worker's latest GPU utilisation.
async fn follow_gpus(mut client: HubClient, updates: mpsc::Sender<(String, i64)>) {
    let request = v1::SubscribeRequest {
        patterns: vec![gpu::METRICS_EVENT.into()],
        ..Default::default()
    };
    let Ok(mut stream) = client.subscribe(request).await else {
        return;
    };
    while let Ok(Some(response)) = stream.message().await {
        let Some(Item::Event(delivery)) = response.item else {
            continue;
        };
        if let Some(percent) = delivery.event.as_ref().and_then(gpu_utilization)
            && updates.send((delivery.worker_id, percent)).await.is_err()
        {
            return;
        }
    }
}

/// The utilisation percent of a `gpu.metrics` event. NVML reports an int; an app writing its own
/// event in that shape may send a float, which is shown rounded rather than not at all.
fn gpu_utilization(event: &v1::TelemetryEvent) -> Option<i64> {
    match event.measurements.get(gpu::UTILIZATION_GPU_PERCENT)?.value {
        Some(Value::IntValue(percent)) => Some(percent),
        Some(Value::FloatValue(percent)) if percent.is_finite() => Some(percent.round() as i64),
        _ => None,
    }
}

pub async fn run(hub: &HubTarget, args: Args) -> Outcome {
    if args.interval < Duration::from_millis(50) {
        return Err(Failure::invalid("--interval: at least 50ms"));
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(Failure::invalid(
            "bridge top needs a terminal; use `bridge workers` (or --format json) in scripts",
        ));
    }
    let mut client = connect(hub).await?;
    let selector = args.pool.clone().map(Selector::Pool);
    // Fail before taking over the screen when the hub refuses us.
    let first = client.list_workers(selector.as_ref()).await?;
    let mut view = View::new(hub.to_string());
    view.refreshed(first);
    let mut terminal = ratatui::init();
    let outcome = event_loop(&mut terminal, &mut view, client, selector, args.interval).await;
    ratatui::restore();
    outcome
}

async fn event_loop(
    terminal: &mut DefaultTerminal,
    view: &mut View,
    client: HubClient,
    selector: Option<Selector>,
    interval: Duration,
) -> Outcome {
    let (results, mut outcomes) = mpsc::channel::<String>(16);
    let (gpu_updates, mut gpus) = mpsc::channel(256);
    let gpu_task = tokio::spawn(follow_gpus(client.clone(), gpu_updates));
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lister = client.clone();
    let outcome = loop {
        let drawn = terminal.draw(|frame| draw(frame, view));
        if let Err(error) = drawn {
            break Err(Failure::new(1, format!("cannot draw: {error}")));
        }
        tokio::select! {
            _ = tick.tick() => match lister.list_workers(selector.as_ref()).await {
                Ok(workers) => view.refreshed(workers),
                Err(error) => view.status = format!("refresh failed: {}", Failure::from(error).message),
            },
            Some(message) = outcomes.recv() => view.status = message,
            Some((id, percent)) = gpus.recv() => {
                view.gpu_utilization.insert(id, percent);
            }
            key = keys.next() => match key {
                Some(Ok(Event::Key(key))) => match on_key(view, key) {
                    Action::Quit => break Ok(()),
                    Action::Send { id, change } => {
                        let results = results.clone();
                        let client = client.clone();
                        tokio::spawn(async move {
                            let _ = results.send(send(client, id, change).await).await;
                        });
                    }
                    Action::Nothing => {}
                },
                Some(Ok(_)) => {}
                Some(Err(error)) => break Err(Failure::new(1, format!("terminal input: {error}"))),
                None => break Ok(()),
            },
        }
    };
    gpu_task.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, pool: &str, rate: f64) -> v1::WorkerInfo {
        v1::WorkerInfo {
            id: id.into(),
            pool: pool.into(),
            connected: true,
            events_per_second: rate,
            ..Default::default()
        }
    }

    fn press(view: &mut View, code: KeyCode) -> Action {
        on_key(view, KeyEvent::new(code, KeyModifiers::NONE))
    }

    #[test]
    fn keys_sort_filter_and_ask_for_a_valid_rate_only() {
        let mut view = View::new("hub".into());
        view.refreshed(vec![
            worker("b", "llama", 5.0),
            worker("a", "mistral", 50.0),
            worker("c", "llama", 1.0),
        ]);
        let ids = |view: &View| {
            view.visible()
                .iter()
                .map(|w| w.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&view), ["a", "b", "c"]);
        press(&mut view, KeyCode::Char('s'));
        press(&mut view, KeyCode::Char('s'));
        assert_eq!(ids(&view), ["a", "b", "c"], "by events/s, busiest first");
        press(&mut view, KeyCode::Char('/'));
        for c in "llama".chars() {
            press(&mut view, KeyCode::Char(c));
        }
        press(&mut view, KeyCode::Enter);
        assert_eq!(ids(&view), ["b", "c"]);
        press(&mut view, KeyCode::Down);
        press(&mut view, KeyCode::Char('r'));
        for c in "1.5".chars() {
            press(&mut view, KeyCode::Char(c));
        }
        assert!(matches!(press(&mut view, KeyCode::Enter), Action::Nothing));
        assert!(
            view.status.contains("not a sampling rate"),
            "{}",
            view.status
        );
        press(&mut view, KeyCode::Char('r'));
        press(&mut view, KeyCode::Char('0'));
        press(&mut view, KeyCode::Char('.'));
        press(&mut view, KeyCode::Char('2'));
        match press(&mut view, KeyCode::Enter) {
            Action::Send { id, change } => {
                assert_eq!(id, "c");
                assert_eq!(change.to_string(), "sampling 0.2");
            }
            _ => panic!("no change asked for"),
        }
    }

    /// The screen `draw` makes of `view`, as text lines.
    fn screen(view: &mut View) -> String {
        let mut terminal =
            ratatui::Terminal::new(ratatui::backend::TestBackend::new(140, 8)).expect("terminal");
        terminal.draw(|frame| draw(frame, view)).expect("draw");
        let buffer = terminal.backend().buffer();
        buffer
            .content()
            .chunks(usize::from(buffer.area.width))
            .map(|line| line.iter().map(|cell| cell.symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_hub_column_shows_in_cluster_mode_only() {
        let mut view = View::new("hub".into());
        view.refreshed(vec![worker("a", "llama", 5.0)]);
        assert!(!screen(&mut view).contains("HUB"));
        let mut remote = worker("b", "llama", 1.0);
        remote.hub = "hub-b".into();
        view.refreshed(vec![worker("a", "llama", 5.0), remote]);
        let text = screen(&mut view);
        assert!(text.contains("HUB") && text.contains("hub-b"), "{text}");
    }

    /// The simulator (`worker --simulate`, `bridge demo`) once reported `gpu.utilization` with
    /// `gpu_percent`, which top never reads: its GPU column showed `-`. Every GPU source (NVML,
    /// fake, simulated) now emits the names in `bridge_proto::protocol::gpu`, the worker's tests
    /// check that, and top reads an event built from those names here.
    #[test]
    fn top_reads_the_gpu_metrics_every_source_emits() {
        let event = v1::TelemetryEvent {
            event_parts: gpu::METRICS_EVENT.split('.').map(str::to_owned).collect(),
            measurements: [(
                gpu::UTILIZATION_GPU_PERCENT.to_owned(),
                v1::TelemetryValue {
                    value: Some(Value::IntValue(73)),
                },
            )]
            .into(),
            metadata: [(gpu::DEVICE.to_owned(), "0".to_owned())].into(),
            ..Default::default()
        };
        let subscribed =
            bridge_proto::pattern::Pattern::parse(gpu::METRICS_EVENT).expect("pattern");
        assert!(subscribed.matches_parts(&event.event_parts));
        let percent = gpu_utilization(&event).expect("a utilisation percent");
        assert_eq!(percent, 73);

        let mut view = View::new("hub".into());
        view.refreshed(vec![worker("gpu-3", "llama", 5.0)]);
        view.gpu_utilization.insert("gpu-3".into(), percent);
        let text = screen(&mut view);
        assert!(text.contains("73%"), "{text}");
    }

    #[test]
    fn sparklines_scale_to_their_own_peak() {
        let history: VecDeque<f64> = [0.0, 5.0, 10.0].into();
        assert_eq!(sparkline(Some(&history)), "▁▅█");
        assert_eq!(sparkline(Some(&[0.0, 0.0].into())), "▁▁");
    }
}
