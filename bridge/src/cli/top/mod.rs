//! `bridge top`: a live terminal view of the workers, refreshed from `ListWorkers`, with keys
//! to sort, filter, and change the selected worker's sampling rate or toggle it through the
//! same admin RPC as `bridge sample` / `bridge toggle`; and of the models they serve, from their
//! inference events.
//!
//! # Layout
//! - this module: the arguments, the view's state, drawing, keys and the event loop.
//! - [`follow`]: the one subscription (GPU metrics, inference events), read in a task of its
//!   own.
//! - [`models`]: the models view's window: rates, error share and percentiles per pool and
//!   model.

mod follow;
mod models;

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use bridge::{
    client::HubClient,
    command::{Change, Selector},
};
use bridge_proto::{sampling::Rate, v1};
use futures_util::StreamExt;
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style, Stylize},
    text::{Line, Span},
    widgets::{Row, Table, TableState},
};
use tokio::sync::mpsc;

use self::{
    follow::{Feed, Reading},
    models::WINDOW_SECONDS,
};
use super::{Failure, HubTarget, Outcome, connect, control::target_line, render};

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
    /// The view to start in; Tab switches.
    #[arg(long, value_enum, default_value_t = Page::Workers)]
    view: Page,
}

/// What the view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Page {
    /// A worker a row.
    Workers,
    /// A pool and model a row, from the inference events of the last seconds.
    Models,
}

impl Page {
    /// The keys this page takes, for the bottom line.
    fn help(self) -> &'static str {
        match self {
            Self::Workers => {
                "q quit  Tab/m models  ↑↓ select  s sort  / filter  r sampling rate  t toggle"
            }
            Self::Models => "q quit  Tab/w workers  ↑↓ select  s sort  / filter",
        }
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelSort {
    Name,
    Requests,
    P99,
    Errors,
}

impl ModelSort {
    fn next(self) -> Self {
        match self {
            Self::Name => Self::Requests,
            Self::Requests => Self::P99,
            Self::P99 => Self::Errors,
            Self::Errors => Self::Name,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Name => "pool/model",
            Self::Requests => "requests/s",
            Self::P99 => "p99",
            Self::Errors => "errors",
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
    page: Page,
    workers: Vec<v1::WorkerInfo>,
    history: HashMap<String, VecDeque<f64>>,
    sort: SortKey,
    filter: String,
    prompt: Option<(Prompt, String)>,
    table: TableState,
    /// What the feed read by the last refresh: GPU utilisation, the models' window, lag.
    feed: Reading,
    model_sort: ModelSort,
    models_table: TableState,
    /// The outcome of the last command, or why the last refresh failed; the page's keys until
    /// there is one.
    status: Option<String>,
}

impl View {
    fn new(hub: String, page: Page) -> Self {
        Self {
            hub,
            page,
            workers: Vec::new(),
            history: HashMap::new(),
            sort: SortKey::Id,
            filter: String::new(),
            prompt: None,
            table: TableState::default().with_selected(Some(0)),
            feed: Reading::default(),
            model_sort: ModelSort::Name,
            models_table: TableState::default().with_selected(Some(0)),
            status: None,
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
            SortKey::Drops => shown.sort_by_key(|w| std::cmp::Reverse(render::drop_total(w))),
        }
        shown
    }

    fn selected(&self) -> Option<v1::WorkerInfo> {
        let index = self.table.selected()?;
        self.visible().get(index).map(|w| (*w).clone())
    }

    /// The models shown, filtered and sorted; `other` last when by name.
    fn visible_models(&self) -> Vec<&models::Row> {
        let mut shown: Vec<&models::Row> = self
            .feed
            .models
            .rows
            .iter()
            .filter(|r| {
                self.filter.is_empty()
                    || r.pool.contains(&self.filter)
                    || r.model.contains(&self.filter)
            })
            .collect();
        let by_name = |a: &&models::Row, b: &&models::Row| {
            (a.other, &a.pool, &a.model).cmp(&(b.other, &b.pool, &b.model))
        };
        match self.model_sort {
            ModelSort::Name => shown.sort_by(by_name),
            ModelSort::Requests => shown.sort_by(|a, b| {
                b.requests_per_second
                    .total_cmp(&a.requests_per_second)
                    .then(by_name(a, b))
            }),
            ModelSort::P99 => shown.sort_by(|a, b| {
                b.duration_p99_ns
                    .cmp(&a.duration_p99_ns)
                    .then(by_name(a, b))
            }),
            ModelSort::Errors => {
                shown.sort_by(|a, b| b.error_share.total_cmp(&a.error_share).then(by_name(a, b)))
            }
        }
        shown
    }

    /// Switches to `page`, whose keys the bottom line then shows.
    fn show(&mut self, page: Page) {
        self.page = page;
        self.status = None;
    }

    /// The table the page shows, and its length.
    fn page_table(&mut self) -> (&mut TableState, usize) {
        match self.page {
            Page::Workers => {
                let shown = self.visible().len();
                (&mut self.table, shown)
            }
            Page::Models => {
                let shown = self.visible_models().len();
                (&mut self.models_table, shown)
            }
        }
    }
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
    match view.page {
        Page::Workers => draw_workers(frame, view, header, body),
        Page::Models => draw_models(frame, view, header, body),
    }
    let bottom = match &view.prompt {
        Some((Prompt::Filter, text)) => {
            let by = match view.page {
                Page::Workers => "id or pool",
                Page::Models => "pool or model",
            };
            format!("filter ({by}): {text}▏")
        }
        Some((Prompt::Rate(id), text)) => format!("sampling rate for {id} (0 to 1): {text}▏"),
        None => view
            .status
            .clone()
            .unwrap_or_else(|| view.page.help().to_owned()),
    };
    frame.render_widget(Line::from(bottom), footer);
}

fn draw_workers(frame: &mut Frame, view: &mut View, header: Rect, body: Rect) {
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
            let gpu = match view.feed.gpu_utilization.get(&w.id) {
                Some(percent) => format!("{percent}%"),
                None => render::gpu_text(w).into_owned(),
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
                render::drop_total(w).to_string(),
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
}

fn draw_models(frame: &mut Frame, view: &mut View, header: Rect, body: Rect) {
    let snapshot = &view.feed.models;
    let total: f64 = snapshot.rows.iter().map(|r| r.requests_per_second).sum();
    let mut title = format!(
        "bridge top  {}  models {}  {total:.1} requests/s  last {WINDOW_SECONDS}s  sort: {}",
        view.hub,
        snapshot.rows.len(),
        view.model_sort.name()
    );
    if !view.filter.is_empty() {
        title.push_str(&format!("  filter: {}", view.filter));
    }
    let mut spans = vec![Span::from(title).bold()];
    // Skipped events are missing from the numbers: say so, rather than show low rates as true.
    if snapshot.skipped > 0 {
        spans.push(
            Span::from(format!(
                "  behind: the hub skipped {} events in the last {WINDOW_SECONDS}s, rates are low",
                snapshot.skipped
            ))
            .bold()
            .red(),
        );
    }
    if let Some(problem) = &view.feed.problem {
        spans.push(Span::from(format!("  {problem}")).yellow());
    }
    frame.render_widget(Line::from(spans), header);

    let visible = view.visible_models();
    if visible.is_empty() {
        let what = if snapshot.rows.is_empty() {
            format!("no inference.stop or inference.exception events in the last {WINDOW_SECONDS}s")
        } else {
            format!("no model matches the filter `{}`", view.filter)
        };
        frame.render_widget(Line::from(what).dim(), body);
        return;
    }
    // As wide as the names shown: a model's numbers stay next to its name on a wide terminal.
    let width = |name: fn(&models::Row) -> &str, title: &str| {
        let widest = visible.iter().map(|r| name(r).chars().count()).max();
        u16::try_from(widest.unwrap_or(0).max(title.len())).unwrap_or(u16::MAX)
    };
    let names = [width(|r| &r.pool, "POOL"), width(|r| &r.model, "MODEL")];
    let needed = names
        .iter()
        .chain(MODEL_COLUMNS.iter().map(|c| &c.1))
        .fold(0u16, |sum, w| {
            sum.saturating_add(*w).saturating_add(COLUMN_SPACING)
        });
    let fits = needed <= body.width.saturating_add(COLUMN_SPACING);
    let columns: Vec<&ModelColumn> = MODEL_COLUMNS.iter().filter(|c| fits || !c.2).collect();
    let rows: Vec<Row> = visible
        .into_iter()
        .map(|r| {
            let cells = [r.pool.clone(), r.model.clone()]
                .into_iter()
                .chain(columns.iter().map(|c| (c.3)(r)));
            let row = Row::new(cells);
            if r.other {
                row.style(Style::new().add_modifier(Modifier::ITALIC))
            } else {
                row
            }
        })
        .collect();
    let widths = names
        .into_iter()
        .chain(columns.iter().map(|c| c.1))
        .map(Constraint::Length);
    let header = ["POOL", "MODEL"]
        .into_iter()
        .chain(columns.iter().map(|c| c.0));
    let table = Table::new(rows, widths)
        .header(
            Row::new(header)
                .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)),
        )
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .column_spacing(COLUMN_SPACING);
    frame.render_stateful_widget(table, body, &mut view.models_table);
}

const COLUMN_SPACING: u16 = 2;

/// A column of the models table after the pool and model: title, width, whether it gives way
/// on a narrow terminal, and the cell.
type ModelColumn = (&'static str, u16, bool, fn(&models::Row) -> String);

const MODEL_COLUMNS: [ModelColumn; 8] = [
    ("REQ/S", 7, false, |r| per_second(r.requests_per_second)),
    ("ERRORS", 6, false, |r| {
        format!("{:.1}%", r.error_share * 100.0)
    }),
    ("P50", 7, false, |r| nanos(r.duration_p50_ns)),
    ("P99", 7, false, |r| nanos(r.duration_p99_ns)),
    ("TTFT P50", 8, false, |r| {
        nanos(r.time_to_first_token_p50_ns)
    }),
    ("TTFT P99", 8, true, |r| nanos(r.time_to_first_token_p99_ns)),
    ("OUT TOK/S", 9, false, |r| {
        per_second(r.output_tokens_per_second)
    }),
    ("EVENTS", 6, true, |r| r.events.to_string()),
];

/// `0.25`, `12.5`, `1840`: a rate with the digits that matter.
fn per_second(rate: f64) -> String {
    if rate < 10.0 {
        format!("{rate:.2}")
    } else if rate < 1_000.0 {
        format!("{rate:.1}")
    } else {
        format!("{rate:.0}")
    }
}

/// `850ns`, `12.3ms`, `1.52s`, `-` for none: three significant digits, about what the
/// histograms keep.
fn nanos(ns: Option<u64>) -> String {
    let Some(ns) = ns else {
        return "-".into();
    };
    let ns = ns as f64;
    let (value, unit) = if ns < 1e3 {
        return format!("{ns}ns");
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    if value < 10.0 {
        format!("{value:.2}{unit}")
    } else if value < 100.0 {
        format!("{value:.1}{unit}")
    } else {
        format!("{value:.0}{unit}")
    }
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
                        view.status = Some(format!("{id}: asking for sampling {rate}…"));
                        return Action::Send {
                            id,
                            change: Change::Sampling {
                                rate,
                                patterns: vec![],
                            },
                        };
                    }
                    Err(()) => {
                        view.status = Some(format!(
                            "`{}` is not a sampling rate: give a number from 0 to 1",
                            text.trim()
                        ));
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
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
        KeyCode::Tab => {
            let other = match view.page {
                Page::Workers => Page::Models,
                Page::Models => Page::Workers,
            };
            view.show(other);
        }
        KeyCode::Char('m') => view.show(Page::Models),
        KeyCode::Char('w') => view.show(Page::Workers),
        KeyCode::Down | KeyCode::Char('j') => {
            let (table, shown) = view.page_table();
            let next = table.selected().map_or(0, |i| i + 1);
            table.select(Some(next.min(shown.saturating_sub(1))));
        }
        KeyCode::Up | KeyCode::Char('k') => {
            let (table, _) = view.page_table();
            let previous = table.selected().map_or(0, |i| i.saturating_sub(1));
            table.select(Some(previous));
        }
        KeyCode::Char('s') => match view.page {
            Page::Workers => view.sort = view.sort.next(),
            Page::Models => view.model_sort = view.model_sort.next(),
        },
        KeyCode::Char('/') => view.prompt = Some((Prompt::Filter, view.filter.clone())),
        KeyCode::Char('r' | 't') if view.page == Page::Models => {
            view.status = Some("r and t change a worker: Tab for the workers view".into());
        }
        KeyCode::Char('r') => match view.selected() {
            Some(worker) => view.prompt = Some((Prompt::Rate(worker.id), String::new())),
            None => view.status = Some("no worker selected".into()),
        },
        KeyCode::Char('t') => match view.selected() {
            Some(worker) => {
                let enabled = worker.control.as_ref().is_none_or(|c| c.enabled);
                view.status = Some(format!(
                    "{}: asking for telemetry {}…",
                    worker.id,
                    if enabled { "off" } else { "on" }
                ));
                return Action::Send {
                    id: worker.id,
                    change: Change::Toggle(!enabled),
                };
            }
            None => view.status = Some("no worker selected".into()),
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
    let mut view = View::new(hub.to_string(), args.view);
    view.refreshed(first);
    let feed = Feed::start(client.clone(), args.pool);
    let mut terminal = ratatui::init();
    let outcome = event_loop(
        &mut terminal,
        &mut view,
        client,
        &feed,
        selector,
        args.interval,
    )
    .await;
    ratatui::restore();
    outcome
}

async fn event_loop(
    terminal: &mut DefaultTerminal,
    view: &mut View,
    client: HubClient,
    feed: &Feed,
    selector: Option<Selector>,
    interval: Duration,
) -> Outcome {
    let (results, mut outcomes) = mpsc::channel::<String>(16);
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lister = client.clone();
    loop {
        let drawn = terminal.draw(|frame| draw(frame, view));
        if let Err(error) = drawn {
            break Err(Failure::new(1, format!("cannot draw: {error}")));
        }
        tokio::select! {
            _ = tick.tick() => {
                view.feed = feed.read();
                match lister.list_workers(selector.as_ref()).await {
                    Ok(workers) => view.refreshed(workers),
                    Err(error) => {
                        view.status = Some(format!("refresh failed: {}", Failure::from(error).message));
                    }
                }
            }
            Some(message) = outcomes.recv() => view.status = Some(message),
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
    }
}

#[cfg(test)]
mod tests {
    use bridge_proto::{protocol::gpu, v1::telemetry_value::Value};

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
        let mut view = View::new("hub".into(), Page::Workers);
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
        let status = view.status.clone().unwrap_or_default();
        assert!(status.contains("not a sampling rate"), "{status}");
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
        let mut view = View::new("hub".into(), Page::Workers);
        view.refreshed(vec![worker("a", "llama", 5.0)]);
        assert!(!screen(&mut view).contains("HUB"));
        let mut remote = worker("b", "llama", 1.0);
        remote.hub = "hub-b".into();
        view.refreshed(vec![worker("a", "llama", 5.0), remote]);
        let text = screen(&mut view);
        assert!(text.contains("HUB") && text.contains("hub-b"), "{text}");
    }

    /// `bridge top` once summed only some of the reasons `bridge workers` lists (not what the
    /// worker sampled out, filtered or disabled), and showed `-` where `bridge workers` showed
    /// `GPU none`: the same worker read differently in the two views.
    #[test]
    fn drops_and_gpu_read_as_in_bridge_workers() {
        let mut w = worker("gpu-3", "llama", 5.0);
        w.worker_counters = [
            ("sampled_out".to_owned(), 900),
            ("dropped.buffer_full".to_owned(), 7),
            ("produced".to_owned(), 1000),
        ]
        .into();
        w.hub_drops = [("invalid".to_owned(), 2)].into();
        w.missing_events = 1;
        w.gpu = "none".into();
        let table = render::workers_table(std::slice::from_ref(&w));
        let row = table.lines().nth(1).expect("a row");
        assert!(
            row.contains("sampled_out=900")
                && row.contains("buffer_full=7")
                && row.contains("hub:invalid=2")
                && row.contains("missing=1")
                && row.contains(" none "),
            "{table}"
        );
        let mut view = View::new("hub".into(), Page::Workers);
        view.refreshed(vec![w]);
        let text = screen(&mut view);
        let line = text.lines().find(|l| l.contains("gpu-3")).expect("row");
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert!(cells.contains(&"910"), "900 + 7 + 2 + 1: {text}");
        assert_eq!(cells.last(), Some(&"none"), "{text}");
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
            follow::PATTERNS.map(|p| bridge_proto::pattern::Pattern::parse(p).expect("pattern"));
        assert!(
            subscribed
                .iter()
                .any(|p| p.matches_parts(&event.event_parts))
        );
        let percent = follow::gpu_utilization(&event).expect("a utilisation percent");
        assert_eq!(percent, 73);

        let mut view = View::new("hub".into(), Page::Workers);
        view.refreshed(vec![worker("gpu-3", "llama", 5.0)]);
        view.feed.gpu_utilization.insert("gpu-3".into(), percent);
        let text = screen(&mut view);
        assert!(text.contains("73%"), "{text}");
    }

    fn model(pool: &str, model: &str, requests_per_second: f64) -> models::Row {
        models::Row {
            pool: pool.into(),
            model: model.into(),
            requests_per_second,
            error_share: 0.01,
            output_tokens_per_second: 2_560.0,
            duration_p50_ns: Some(12_345_678),
            duration_p99_ns: Some(1_520_000_000),
            time_to_first_token_p50_ns: Some(850),
            time_to_first_token_p99_ns: None,
            events: 40,
            ..Default::default()
        }
    }

    #[test]
    fn the_models_view_shows_a_row_per_model_and_the_key_that_leads_there() {
        let mut view = View::new("hub".into(), Page::Workers);
        view.refreshed(vec![worker("gpu-1", "llama", 5.0)]);
        view.feed.models.rows = vec![
            model("llama", "llama-70b", 20.0),
            models::Row {
                pool: "*".into(),
                model: "other".into(),
                other: true,
                ..model("", "", 0.5)
            },
            model("mistral", "mistral-7b", 4.0),
        ];
        let text = screen(&mut view);
        assert!(text.contains("Tab/m models"), "{text}");

        press(&mut view, KeyCode::Tab);
        let text = screen(&mut view);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("models 3  24.5 requests/s  last 10s  sort: pool/model"),
            "{text}"
        );
        assert!(
            lines[1].contains("REQ/S") && lines[1].contains("TTFT P50"),
            "{text}"
        );
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[2]),
            [
                "llama",
                "llama-70b",
                "20.0",
                "1.0%",
                "12.3ms",
                "1.52s",
                "850ns",
                "-",
                "2560",
                "40"
            ],
            "{text}"
        );
        assert!(lines[3].contains("mistral-7b"), "{text}");
        assert!(lines[4].contains("other"), "other comes last: {text}");
        assert!(lines[7].contains("Tab/w workers"), "{text}");
        assert!(!text.contains("behind"), "{text}");

        // A lag notice is shown, not hidden: the rates are missing what the hub skipped.
        view.feed.models.skipped = 1234;
        let text = screen(&mut view);
        assert!(
            text.lines()
                .next()
                .is_some_and(|l| l.contains("skipped 1234 events")),
            "{text}"
        );
    }

    #[test]
    fn a_narrow_terminal_drops_the_least_needed_model_columns() {
        let mut view = View::new("hub".into(), Page::Models);
        view.feed.models.rows = vec![model("llama-70b", "llama-70b", 20.0)];
        let mut terminal =
            ratatui::Terminal::new(ratatui::backend::TestBackend::new(80, 5)).expect("terminal");
        terminal.draw(|frame| draw(frame, &mut view)).expect("draw");
        let buffer = terminal.backend().buffer();
        let line = |y: u16| {
            (0..buffer.area.width)
                .map(|x| buffer[(x, y)].symbol())
                .collect::<String>()
        };
        let (header, row) = (line(1), line(2));
        assert!(header.contains("OUT TOK/S"), "{header}");
        assert!(
            !header.contains("TTFT P99") && !header.contains("EVENTS"),
            "{header}"
        );
        assert!(row.contains("llama-70b  llama-70b"), "{row}");
        assert!(
            screen(&mut view).contains("TTFT P99"),
            "140 columns have room"
        );
    }

    #[test]
    fn keys_sort_and_filter_the_models_and_leave_workers_alone() {
        let mut view = View::new("hub".into(), Page::Models);
        view.refreshed(vec![worker("gpu-1", "llama", 5.0)]);
        view.feed.models.rows = vec![
            model("llama", "llama-70b", 20.0),
            models::Row {
                duration_p99_ns: Some(9_000_000_000),
                ..model("mistral", "mistral-7b", 4.0)
            },
        ];
        let names = |view: &View| {
            view.visible_models()
                .iter()
                .map(|r| r.model.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&view), ["llama-70b", "mistral-7b"]);
        press(&mut view, KeyCode::Char('s'));
        assert_eq!(view.model_sort, ModelSort::Requests);
        assert_eq!(view.sort, SortKey::Id, "the workers' sort is their own");
        press(&mut view, KeyCode::Char('s'));
        assert_eq!(
            names(&view),
            ["mistral-7b", "llama-70b"],
            "slowest p99 first"
        );
        press(&mut view, KeyCode::Char('/'));
        for c in "70b".chars() {
            press(&mut view, KeyCode::Char(c));
        }
        press(&mut view, KeyCode::Enter);
        assert_eq!(names(&view), ["llama-70b"]);
        assert!(matches!(
            press(&mut view, KeyCode::Char('t')),
            Action::Nothing
        ));
        assert!(
            view.status
                .as_deref()
                .is_some_and(|s| s.contains("workers view"))
        );
        press(&mut view, KeyCode::Char('w'));
        assert_eq!(view.page, Page::Workers);
        assert_eq!(view.status, None, "the workers' keys show again");

        view.filter = "nothing".into();
        press(&mut view, KeyCode::Char('m'));
        assert!(screen(&mut view).contains("no model matches the filter `nothing`"));
        view.filter.clear();
        view.feed.models.rows.clear();
        assert!(screen(&mut view).contains("no inference.stop or inference.exception events"));
    }

    #[test]
    fn view_models_starts_in_the_models_view() {
        #[derive(clap::Parser)]
        struct Top {
            #[command(flatten)]
            args: Args,
        }
        let top = <Top as clap::Parser>::try_parse_from(["top", "--view", "models"]).expect("args");
        assert_eq!(top.args.view, Page::Models);
        let top = <Top as clap::Parser>::try_parse_from(["top"]).expect("args");
        assert_eq!(top.args.view, Page::Workers);
    }

    #[test]
    fn durations_and_rates_keep_three_digits() {
        assert_eq!(nanos(None), "-");
        assert_eq!(nanos(Some(999)), "999ns");
        assert_eq!(nanos(Some(1_500)), "1.50µs");
        assert_eq!(nanos(Some(45_600_000)), "45.6ms");
        assert_eq!(nanos(Some(456_000_000)), "456ms");
        assert_eq!(nanos(Some(2_000_000_000)), "2.00s");
        assert_eq!(per_second(0.25), "0.25");
        assert_eq!(per_second(12.34), "12.3");
        assert_eq!(per_second(1_840.4), "1840");
    }

    #[test]
    fn sparklines_scale_to_their_own_peak() {
        let history: VecDeque<f64> = [0.0, 5.0, 10.0].into();
        assert_eq!(sparkline(Some(&history)), "▁▅█");
        assert_eq!(sparkline(Some(&[0.0, 0.0].into())), "▁▁");
    }
}
