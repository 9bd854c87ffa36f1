//! The control plane: desired control state per worker, with versions, persisted.
//!
//! Settings live at four kinds of levels (global, pool, label, worker), each seeded from
//! `config.toml` and changed at runtime by operators; [`layer`] says how they combine, and
//! [`labels`] which label levels apply to a worker. Runtime changes and the
//! version counter are saved in the state directory ([`store`]) before they are pushed to any
//! worker, so an acknowledged change survives a hub restart. Every start takes a new version,
//! so versions only ever grow, even when `config.toml` changed in between.

pub mod config;
pub mod labels;
pub mod layer;
pub mod store;
pub mod target;
pub mod timed;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Mutex, MutexGuard},
};

use bridge_proto::{control::ControlState, sampling::Rate, v1};

use self::{
    config::{ControlConfig, LayerConfig},
    labels::LabelLevels,
    layer::{FilterSpec, Invalid, Layer, RuleKey, Setting, deciding_level, merge},
    store::{Snapshot, Store},
    target::EventRate,
    timed::Reverted,
};
use crate::{
    command::{Change, Selector},
    error::{Error, Result},
};

/// Settings from `config.toml`, all at version 0.
#[derive(Debug, Default)]
pub(crate) struct Configured {
    global: Layer,
    pools: BTreeMap<String, Layer>,
    workers: BTreeMap<String, Layer>,
    labels: LabelLevels,
}

impl Configured {
    /// Validates `[control]` into levels, naming the key of the first bad value. It is also
    /// how `config.toml` is checked at load, so what loads is what the control plane takes.
    pub(crate) fn from_config(config: &ControlConfig) -> Result<Self, Invalid> {
        let levels = |kind: &str, levels: &BTreeMap<String, LayerConfig>| {
            levels
                .iter()
                .map(|(name, level)| {
                    let layer = Layer::from_config(&format!("control.{kind}.{name}"), level)?;
                    Ok((name.clone(), layer))
                })
                .collect::<Result<_, Invalid>>()
        };
        Ok(Self {
            global: Layer::global_from_config(config)?,
            pools: levels("pools", &config.pools)?,
            workers: levels("workers", &config.workers)?,
            labels: labels::from_config(&config.labels)?,
        })
    }
}

#[derive(Debug)]
struct Book {
    configured: Configured,
    runtime: Snapshot,
    /// The version taken at start; every worker's state is at least this new.
    epoch: u64,
}

/// Desired control state, shared by every task of the hub.
#[derive(Debug)]
pub struct ControlPlane {
    book: Mutex<Book>,
    store: Store,
    /// Asks the thread that flushes the state file to disk to do so, after writing the
    /// snapshot it is given, if any (see `store`).
    syncer: std::sync::mpsc::Sender<Option<Snapshot>>,
    /// Serialises changes from the moment they are made until they are pushed to workers, so
    /// that no worker can receive an older state after a newer one.
    changes: tokio::sync::Mutex<()>,
    /// Wakes the task that reverts timed changes (see `reverts`) when expiries may have moved.
    expiries: tokio::sync::Notify,
}

/// A change that has been saved; the next change waits until this is dropped.
#[derive(Debug)]
pub struct Applied<'a> {
    pub version: u64,
    _serialised: tokio::sync::MutexGuard<'a, ()>,
}

impl ControlPlane {
    /// Loads the state directory, takes a new version for this start, and saves it.
    ///
    /// A clustered hub keeps its own copy of the cluster's state instead (see
    /// `cluster::control`): its versions are the cluster's, so it takes none of its own
    /// and serves the copy until the cluster's state is loaded.
    pub fn open(config: &ControlConfig, state_dir: &Path, clustered: bool) -> Result<Self> {
        // `Config::load` checked this already; a config built in code has not been.
        let configured = Configured::from_config(config)
            .map_err(|invalid| Error::invalid(format!("config.toml: {invalid}")))?;
        let file_name = if clustered {
            store::CLUSTER_FILE_NAME
        } else {
            store::FILE_NAME
        };
        let store = Store::open(state_dir, file_name)?;
        let mut runtime = store.load()?;
        if clustered {
            // Version 0 cannot be acknowledged; the cluster's own versions replace this one
            // once its state is loaded.
            runtime.version = runtime.version.max(1);
        } else {
            runtime.version += 1;
            store.save(&runtime)?;
            store.sync()?;
        }
        let (syncer, requests) = std::sync::mpsc::channel::<Option<Snapshot>>();
        let syncing = store.clone();
        std::thread::Builder::new()
            .name("state-sync".into())
            .spawn(move || {
                while let Ok(first) = requests.recv() {
                    // One write and flush covers every request made before it.
                    let mut latest = first;
                    while let Ok(next) = requests.try_recv() {
                        latest = next.or(latest);
                    }
                    let written = latest.map_or(Ok(()), |snapshot| syncing.save(&snapshot));
                    if let Err(error) = written.and_then(|()| syncing.sync()) {
                        tracing::warn!(%error, "control state not saved to disk");
                    }
                }
            })
            .map_err(|source| Error::StateWrite {
                path: store.path().to_owned(),
                source,
            })?;
        Ok(Self {
            book: Mutex::new(Book {
                epoch: runtime.version,
                configured,
                runtime,
            }),
            store,
            syncer,
            changes: tokio::sync::Mutex::new(()),
            expiries: tokio::sync::Notify::new(),
        })
    }

    /// Takes a layer from the cluster's state, unless the book already holds a newer one.
    /// Returns whether anything changed; the copy on disk follows in the background.
    pub fn set_layer(&self, selector: &Selector, layer: Layer) -> bool {
        let mut book = self.book();
        let runtime = &mut book.runtime;
        if runtime
            .layer(selector)
            .is_some_and(|held| held.version >= layer.version)
        {
            return false;
        }
        runtime.version = runtime.version.max(layer.version);
        *runtime.layer_mut(selector) = layer;
        let _ = self.syncer.send(Some(runtime.clone()));
        self.expiries.notify_one();
        true
    }

    /// Replaces the operators' settings with the cluster's, just loaded, and makes `epoch`
    /// the least version of every state from now on. Wholesale rather than layer by layer, so
    /// that levels the cluster no longer has (removed, or a recreated bucket) go too.
    ///
    /// The `refused` levels are in the cluster but not valid: they keep what this hub held for
    /// them (unless `layers` has a valid one after all), as they would have had the invalid
    /// value arrived while following. Dropping them would be treating them as removed.
    pub fn load_cluster(&self, layers: Vec<(Selector, Layer)>, refused: &[Selector], epoch: u64) {
        let mut book = self.book();
        let mut runtime = Snapshot {
            format: store::FORMAT,
            version: epoch,
            ..Snapshot::default()
        };
        let held: Vec<_> = refused
            .iter()
            .filter_map(|selector| Some((selector.clone(), book.runtime.layer(selector)?.clone())))
            .collect();
        for (selector, layer) in held.into_iter().chain(layers) {
            runtime.version = runtime.version.max(layer.version);
            *runtime.layer_mut(&selector) = layer;
        }
        let _ = self.syncer.send(Some(runtime.clone()));
        book.runtime = runtime;
        book.epoch = epoch;
        self.expiries.notify_one();
    }

    /// Makes changes one at a time: states computed and pushed while holding the guard cannot
    /// overtake one another.
    pub async fn lock_changes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// Flushes the state file to disk now.
    pub fn flush(&self) -> Result<()> {
        self.store.sync()
    }

    pub fn state_file(&self) -> &Path {
        self.store.path()
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock cannot leave the book half-edited (edits are applied to
        // a copy), so a poisoned lock is still safe to use.
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state a worker with this id (if any) in this pool (empty: none) with these labels
    /// should apply.
    pub fn effective(
        &self,
        worker: Option<&str>,
        pool: &str,
        labels: &BTreeMap<String, String>,
    ) -> ControlState {
        let book = self.book();
        let chain = book.chain(worker, pool, labels);
        let version = chain
            .iter()
            .map(|layer| layer.version)
            .fold(book.epoch, u64::max);
        merge(chain, version)
    }

    /// When the first timed setting in force for such a worker reverts, Unix milliseconds.
    pub fn next_expiry_in_force(
        &self,
        worker: Option<&str>,
        pool: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<u64> {
        let book = self.book();
        timed::earliest_in_force(&book.chain(worker, pool, labels))
    }

    /// When the first timed setting of any level reverts, Unix milliseconds.
    pub fn next_expiry(&self) -> Option<u64> {
        let book = self.book();
        book.runtime
            .levels()
            .filter_map(|(_, layer)| timed::earliest(layer))
            .min()
    }

    /// Notified when a change may have added an earlier expiry.
    pub fn expiries_changed(&self) -> &tokio::sync::Notify {
        &self.expiries
    }

    /// The levels with a setting due to revert at `now_ms` (cluster mode: each is reverted in
    /// the cluster's state, which this hub then follows).
    pub fn due_levels(&self, now_ms: u64) -> Vec<Selector> {
        let book = self.book();
        book.runtime
            .levels()
            .filter(|(_, layer)| timed::earliest(layer).is_some_and(|at| at <= now_ms))
            .map(|(selector, _)| selector)
            .collect()
    }

    /// Reverts every setting due at `now_ms`, as one change, and saves it; `None` when nothing
    /// was due. Push the resulting states to the workers of each level before dropping the
    /// returned guard.
    pub async fn revert_due(
        &self,
        now_ms: u64,
    ) -> Result<Option<(Applied<'_>, Vec<(Selector, Vec<Reverted>)>)>> {
        let serialised = self.changes.lock().await;
        let (previous, snapshot, reverted) = {
            let mut book = self.book();
            let previous = book.runtime.clone();
            let version = book.runtime.version + 1;
            let mut reverted = Vec::new();
            for (selector, layer) in book.runtime.levels_mut() {
                let settings = timed::revert_due(layer, now_ms);
                if !settings.is_empty() {
                    layer.version = version;
                    reverted.push((selector, settings));
                }
            }
            if reverted.is_empty() {
                return Ok(None);
            }
            book.runtime.version = version;
            (previous, book.runtime.clone(), reverted)
        };
        let applied = self.save(previous, snapshot, serialised).await?;
        Ok(Some((applied, reverted)))
    }

    /// The levels with a target in force: each with its goal and the rate it chose.
    pub fn target_levels(&self) -> Vec<(Selector, EventRate, Rate)> {
        let book = self.book();
        book.runtime
            .levels()
            .filter_map(|(selector, layer)| {
                let (goal, rate) = layer.target_in_force()?;
                Some((selector, goal, rate))
            })
            .collect()
    }

    /// The target in force at the level that decides a worker's sampling rate (the one
    /// `layer::merge` takes it from), if that level has one.
    pub fn target_for(
        &self,
        worker: Option<&str>,
        pool: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<EventRate> {
        let book = self.book();
        let chain = book.chain(worker, pool, labels);
        let (decides, _) = deciding_level(
            chain
                .into_iter()
                .map(|layer| (layer, layer.sampling_rate.as_ref())),
        )?;
        decides.target_in_force().map(|(goal, _)| goal)
    }

    /// Sets the rate the controller chose for a level under a target, as one change, and
    /// saves it (see [`steer_layer`]); `None` when the level changed since the controller
    /// looked. Push the result to the level's workers before dropping the guard.
    pub async fn steer(
        &self,
        selector: &Selector,
        from: Rate,
        to: Rate,
    ) -> Result<Option<Applied<'_>>> {
        let serialised = self.changes.lock().await;
        let (previous, snapshot) = {
            let mut book = self.book();
            let previous = book.runtime.clone();
            let version = book.runtime.version + 1;
            let Some(layer) = book.runtime.levels_mut().find(|(s, _)| s == selector) else {
                return Ok(None);
            };
            if !steer_layer(layer.1, from, to, version) {
                return Ok(None);
            }
            book.runtime.version = version;
            (previous, book.runtime.clone())
        };
        self.save(previous, snapshot, serialised).await.map(Some)
    }

    /// The levels behind [`Self::effective`], for display.
    pub fn describe(
        &self,
        worker: Option<&str>,
        pool: &str,
        labels: &BTreeMap<String, String>,
    ) -> v1::GetControlResponse {
        let effective = self.effective(worker, pool, labels);
        let book = self.book();
        let combine = |configured: Option<&Layer>, runtime: Option<&Layer>| {
            let (configured, runtime) = (configured.cloned(), runtime.cloned());
            let layers: Vec<Layer> = configured.into_iter().chain(runtime).collect();
            (!layers.is_empty()).then(|| {
                let version = layers.iter().map(|l| l.version).max().unwrap_or(0);
                let mut wire = merge_layer(&layers).to_wire();
                wire.version = version;
                wire
            })
        };
        v1::GetControlResponse {
            effective: Some(v1::ControlState::from(&effective)),
            global: combine(Some(&book.configured.global), Some(&book.runtime.global)),
            pool: (!pool.is_empty())
                .then(|| {
                    combine(
                        book.configured.pools.get(pool),
                        book.runtime.pools.get(pool),
                    )
                })
                .flatten(),
            worker: worker.and_then(|id| {
                combine(
                    book.configured.workers.get(id),
                    book.runtime.workers.get(id),
                )
            }),
            labels: labels::matching(&book.configured.labels, &book.runtime.labels, labels)
                .into_iter()
                .filter_map(|(set, [configured, runtime])| {
                    Some(v1::LabelLayer {
                        labels: set.labels().clone().into_iter().collect(),
                        layer: Some(combine(configured, runtime)?),
                    })
                })
                .collect(),
        }
    }

    /// Whether some label level applies to a worker with these labels: if none does, its state
    /// depends on its pool (and its own settings) alone.
    pub fn label_levels_apply(&self, labels: &BTreeMap<String, String>) -> bool {
        if labels.is_empty() {
            return false;
        }
        let book = self.book();
        labels::any_matches(&book.configured.labels, labels)
            || labels::any_matches(&book.runtime.labels, labels)
    }

    /// Whether settings exist for this worker id (so it may be addressed before it connects).
    pub fn has_worker_settings(&self, id: &str) -> bool {
        let book = self.book();
        book.configured.workers.contains_key(id) || book.runtime.workers.contains_key(id)
    }

    /// Records a change and saves it. Push the resulting states to workers before dropping the
    /// returned guard.
    pub async fn apply(&self, selector: &Selector, change: &Change) -> Result<Applied<'_>> {
        self.apply_timed(selector, change, None).await
    }

    /// [`Self::apply`] for a change that reverts at `until` (Unix milliseconds), if timed.
    pub async fn apply_timed(
        &self,
        selector: &Selector,
        change: &Change,
        until: Option<u64>,
    ) -> Result<Applied<'_>> {
        let serialised = self.changes.lock().await;
        let (previous, snapshot) = {
            let mut book = self.book();
            let previous = book.runtime.clone();
            book.runtime.version += 1;
            let version = book.runtime.version;
            apply_timed_change(book.runtime.layer_mut(selector), change, version, until);
            (previous, book.runtime.clone())
        };
        let applied = self.save(previous, snapshot, serialised).await?;
        if until.is_some() {
            self.expiries.notify_one();
        }
        Ok(applied)
    }

    /// Saves `snapshot`, the book's new runtime state; puts `previous` back when it cannot be.
    async fn save<'a>(
        &'a self,
        previous: Snapshot,
        snapshot: Snapshot,
        serialised: tokio::sync::MutexGuard<'a, ()>,
    ) -> Result<Applied<'a>> {
        let store = self.store.clone();
        let syncer = self.syncer.clone();
        let saved = tokio::task::spawn_blocking(move || {
            store.save(&snapshot)?;
            // Durable against a power loss a moment later; the command need not wait for it.
            let _ = syncer.send(None);
            Ok(())
        })
        .await
        .unwrap_or_else(|join| {
            Err(Error::StateWrite {
                path: self.store.path().to_owned(),
                source: std::io::Error::other(join.to_string()),
            })
        });
        let mut book = self.book();
        if let Err(error) = saved {
            book.runtime = previous;
            // The operator's command fails too, but whoever watches the hub must hear of it:
            // every later change will fail the same way until the disk is fixed.
            tracing::error!(%error, "control change refused: the state file cannot be written");
            return Err(error);
        }
        Ok(Applied {
            version: book.runtime.version,
            _serialised: serialised,
        })
    }
}

impl Snapshot {
    /// Every level with runtime settings.
    fn levels(&self) -> impl Iterator<Item = (Selector, &Layer)> {
        let pools = self.pools.iter();
        let labels = self.labels.iter();
        let workers = self.workers.iter();
        std::iter::once((Selector::All, &self.global))
            .chain(pools.map(|(pool, layer)| (Selector::Pool(pool.clone()), layer)))
            .chain(labels.map(|(set, layer)| (Selector::Labels(set.clone()), layer)))
            .chain(workers.map(|(id, layer)| (Selector::Worker(id.clone()), layer)))
    }

    /// [`Self::levels`], to change them.
    fn levels_mut(&mut self) -> impl Iterator<Item = (Selector, &mut Layer)> {
        let pools = self.pools.iter_mut();
        let labels = self.labels.iter_mut();
        let workers = self.workers.iter_mut();
        std::iter::once((Selector::All, &mut self.global))
            .chain(pools.map(|(pool, layer)| (Selector::Pool(pool.clone()), layer)))
            .chain(labels.map(|(set, layer)| (Selector::Labels(set.clone()), layer)))
            .chain(workers.map(|(id, layer)| (Selector::Worker(id.clone()), layer)))
    }

    /// A level's runtime settings, if it has any.
    fn layer(&self, selector: &Selector) -> Option<&Layer> {
        match selector {
            Selector::All => Some(&self.global),
            Selector::Pool(pool) => self.pools.get(pool),
            Selector::Worker(id) => self.workers.get(id),
            Selector::Labels(set) => self.labels.get(set),
        }
    }

    /// A level's runtime settings, empty ones made for it when it has none.
    fn layer_mut(&mut self, selector: &Selector) -> &mut Layer {
        match selector {
            Selector::All => &mut self.global,
            Selector::Pool(pool) => self.pools.entry(pool.clone()).or_default(),
            Selector::Worker(id) => self.workers.entry(id.clone()).or_default(),
            Selector::Labels(set) => self.labels.entry(set.clone()).or_default(),
        }
    }
}

impl Book {
    /// The levels that apply to a worker, most general first.
    fn chain(
        &self,
        worker: Option<&str>,
        pool: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<&Layer> {
        let mut chain = vec![&self.configured.global, &self.runtime.global];
        if !pool.is_empty() {
            chain.extend(self.configured.pools.get(pool));
            chain.extend(self.runtime.pools.get(pool));
        }
        for (_, levels) in labels::matching(&self.configured.labels, &self.runtime.labels, labels) {
            chain.extend(levels.into_iter().flatten());
        }
        if let Some(id) = worker {
            chain.extend(self.configured.workers.get(id));
            chain.extend(self.runtime.workers.get(id));
        }
        chain
    }
}

#[cfg(test)]
pub(crate) fn apply_change(layer: &mut Layer, change: &Change, version: u64) {
    apply_timed_change(layer, change, version, None);
}

/// Makes `change` at `layer` as `version`; with `until` (Unix milliseconds) each setting it
/// makes reverts then (see `timed`). A reset is never timed.
pub(crate) fn apply_timed_change(
    layer: &mut Layer,
    change: &Change,
    version: u64,
    until: Option<u64>,
) {
    match change {
        Change::Sampling { rate, patterns } if patterns.is_empty() => {
            let current = layer.sampling_rate.take();
            layer.sampling_rate = Some(timed::replace(current, *rate, version, until));
            // A fixed rate ends the level's target; a timed one suspends it until it reverts.
            layer.target = match (layer.target.take(), until) {
                (Some(target), Some(_)) => Some(timed::replace(Some(target), None, version, until)),
                _ => None,
            };
        }
        Change::Sampling { rate, patterns } => {
            for pattern in patterns {
                let key = RuleKey(pattern.clone());
                let current = layer.rules.remove(&key);
                let setting = timed::replace(current, *rate, version, until);
                layer.rules.insert(key, setting);
            }
        }
        Change::Toggle(enabled) => {
            let current = layer.enabled.take();
            layer.enabled = Some(timed::replace(current, *enabled, version, until));
        }
        Change::Filter { allow, block } => {
            let filter = FilterSpec {
                allow: allow.clone(),
                block: block.clone(),
            };
            let current = layer.filter.take();
            layer.filter = Some(timed::replace(current, filter, version, until));
        }
        Change::Reset => *layer = Layer::default(),
        Change::Target { goal, start } => {
            // A new goal for a level already steered goes on from the rate chosen so far.
            let rate = layer.target_in_force().map_or(*start, |(_, rate)| rate);
            layer.sampling_rate = Some(Setting::new(rate, version));
            layer.target = Some(Setting::new(Some(*goal), version));
        }
    }
    layer.version = version;
}

/// Sets the rate that the controller chose for a level under a target (see `steering`),
/// keeping the target; `false`, changing nothing, unless the target is still in force and
/// the level's rate is still `from` (a change made since the controller looked wins).
///
/// The level takes `version` (so that its workers are pushed the rate), but the rate keeps
/// the version of the operator's command that set the target: between levels, the rate is as
/// new as that command, so a rate set at a narrower level after it keeps deciding for its
/// workers however often the controller adjusts.
pub(crate) fn steer_layer(layer: &mut Layer, from: Rate, to: Rate, version: u64) -> bool {
    let steered = layer.target.as_ref().is_some_and(|t| t.value.is_some());
    let Some(current) = layer.sampling_rate.as_mut() else {
        return false;
    };
    if !steered || current.value != from {
        return false;
    }
    current.value = to;
    layer.version = version;
    true
}

/// One level's configured and runtime settings seen as one (runtime wins, being newer).
fn merge_layer(layers: &[Layer]) -> Layer {
    let mut merged = Layer::default();
    for layer in layers {
        if layer.enabled.is_some() {
            merged.enabled.clone_from(&layer.enabled);
        }
        if layer.sampling_rate.is_some() {
            merged.sampling_rate.clone_from(&layer.sampling_rate);
        }
        if layer.filter.is_some() {
            merged.filter.clone_from(&layer.filter);
        }
        if layer.target.is_some() {
            merged.target.clone_from(&layer.target);
        }
        merged
            .rules
            .extend(layer.rules.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    merged
}

#[cfg(test)]
mod tests {
    use bridge_proto::sampling::Rate;

    use super::*;

    fn none() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn rate(r: f64) -> Rate {
        Rate::new(r).unwrap()
    }

    fn sampling(r: f64) -> Change {
        Change::Sampling {
            rate: rate(r),
            patterns: vec![],
        }
    }

    #[tokio::test]
    async fn changes_persist_and_versions_grow_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let config = ControlConfig::default();
        let plane = ControlPlane::open(&config, dir.path(), false).unwrap();
        let start = plane.effective(Some("gpu-3"), "llama", &none()).version;
        let v = plane
            .apply(&Selector::Worker("gpu-3".into()), &sampling(0.1))
            .await
            .unwrap()
            .version;
        assert!(v > start);
        let state = plane.effective(Some("gpu-3"), "llama", &none());
        assert_eq!((state.version, state.default_rate.get()), (v, 0.1));
        assert_eq!(
            plane
                .effective(Some("gpu-4"), "llama", &none())
                .default_rate
                .get(),
            1.0
        );
        drop(plane);

        let plane = ControlPlane::open(&config, dir.path(), false).unwrap();
        let state = plane.effective(Some("gpu-3"), "llama", &none());
        assert_eq!(state.default_rate.get(), 0.1);
        assert!(state.version > v, "a restart takes a new version");
        assert!(plane.has_worker_settings("gpu-3"));
    }

    #[tokio::test]
    async fn pool_settings_apply_to_workers_that_join_later_and_all_overrides_older() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ControlConfig::default();
        config.workers.insert(
            "gpu-1".into(),
            LayerConfig {
                sampling_rate: Some(0.9),
                ..Default::default()
            },
        );
        let plane = ControlPlane::open(&config, dir.path(), false).unwrap();
        assert_eq!(
            plane
                .effective(Some("gpu-1"), "", &none())
                .default_rate
                .get(),
            0.9
        );

        plane
            .apply(&Selector::Pool("llama".into()), &sampling(0.5))
            .await
            .unwrap();
        assert_eq!(
            plane
                .effective(Some("new"), "llama", &none())
                .default_rate
                .get(),
            0.5
        );
        assert_eq!(
            plane
                .effective(Some("new"), "other", &none())
                .default_rate
                .get(),
            1.0
        );

        plane.apply(&Selector::All, &sampling(0.2)).await.unwrap();
        assert_eq!(
            plane
                .effective(Some("gpu-1"), "llama", &none())
                .default_rate
                .get(),
            0.2
        );
        plane
            .apply(&Selector::Worker("gpu-1".into()), &sampling(0.3))
            .await
            .unwrap();
        assert_eq!(
            plane
                .effective(Some("gpu-1"), "llama", &none())
                .default_rate
                .get(),
            0.3
        );

        plane.apply(&Selector::All, &Change::Reset).await.unwrap();
        assert_eq!(
            plane
                .effective(Some("x"), "llama", &none())
                .default_rate
                .get(),
            0.5
        );
    }

    #[tokio::test]
    async fn label_levels_sit_between_pool_and_worker_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let level = |rate: f64| LayerConfig {
            sampling_rate: Some(rate),
            ..Default::default()
        };
        let mut config = ControlConfig::default();
        config.pools.insert("llama".into(), level(0.9));
        config.labels.insert("zone=a".into(), level(0.8));
        config.labels.insert("rack=3,zone=a".into(), level(0.7));
        config.workers.insert("gpu-1".into(), level(0.6));
        let labels = |items: &[&str]| -> BTreeMap<String, String> {
            items
                .iter()
                .map(|item| {
                    let (k, v) = item.split_once('=').unwrap();
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        };
        let plane = ControlPlane::open(&config, dir.path(), false).unwrap();
        let rate = |plane: &ControlPlane, id: &str, items: &[&str]| {
            plane
                .effective(Some(id), "llama", &labels(items))
                .default_rate
                .get()
        };
        // Configured ties: worker > label (more labels first) > pool.
        assert_eq!(rate(&plane, "gpu-1", &["zone=a", "rack=3"]), 0.6);
        assert_eq!(rate(&plane, "gpu-2", &["zone=a", "rack=3"]), 0.7);
        assert_eq!(rate(&plane, "gpu-2", &["zone=a", "rack=4"]), 0.8);
        assert_eq!(rate(&plane, "gpu-2", &["zone=b"]), 0.9);
        assert!(plane.label_levels_apply(&labels(&["zone=a"])));
        assert!(!plane.label_levels_apply(&labels(&["zone=b"])));

        let zone_b =
            Selector::Labels(bridge_proto::labels::LabelSet::parse_canonical("zone=b").unwrap());
        plane.apply(&zone_b, &sampling(0.25)).await.unwrap();
        assert_eq!(rate(&plane, "gpu-2", &["zone=b", "rack=1"]), 0.25);
        assert_eq!(
            rate(&plane, "gpu-1", &["zone=b"]),
            0.25,
            "newer than gpu-1's own"
        );
        let shown = plane.describe(Some("gpu-3"), "llama", &labels(&["zone=b"]));
        assert_eq!(shown.labels.len(), 1);
        assert_eq!(shown.labels[0].labels["zone"], "b");
        drop(plane);

        let plane = ControlPlane::open(&config, dir.path(), false).unwrap();
        assert_eq!(rate(&plane, "gpu-2", &["zone=b"]), 0.25);
        assert_eq!(rate(&plane, "gpu-2", &["zone=c"]), 0.9);
    }

    #[tokio::test]
    async fn a_timed_change_at_a_label_level_reverts_and_says_when() {
        let dir = tempfile::tempdir().unwrap();
        let plane = ControlPlane::open(&ControlConfig::default(), dir.path(), false).unwrap();
        let zone_a =
            Selector::Labels(bridge_proto::labels::LabelSet::parse_canonical("zone=a").unwrap());
        let labels = BTreeMap::from([("zone".to_owned(), "a".to_owned())]);
        let now = timed::now_ms();
        plane
            .apply_timed(&zone_a, &sampling(0.25), Some(now + 1_000))
            .await
            .unwrap();
        let rate = || {
            plane
                .effective(Some("gpu-1"), "", &labels)
                .default_rate
                .get()
        };
        assert_eq!(rate(), 0.25);
        assert_eq!(plane.next_expiry(), Some(now + 1_000));
        assert_eq!(
            plane.next_expiry_in_force(Some("gpu-1"), "", &labels),
            Some(now + 1_000)
        );
        assert_eq!(plane.due_levels(now + 1_000), std::slice::from_ref(&zone_a));
        let (_, reverted) = plane.revert_due(now + 1_000).await.unwrap().expect("due");
        assert_eq!(reverted[0].0, zone_a);
        assert_eq!(rate(), 1.0);
        assert_eq!(plane.next_expiry(), None);
    }

    #[test]
    fn a_cluster_level_refused_at_load_keeps_what_the_hub_held() {
        let dir = tempfile::tempdir().unwrap();
        let plane = ControlPlane::open(&ControlConfig::default(), dir.path(), true).unwrap();
        let pool = Selector::Pool("llama".into());
        let level = |r: f64, version: u64| {
            let mut layer = Layer::default();
            apply_change(&mut layer, &sampling(r), version);
            layer
        };
        let rate =
            |plane: &ControlPlane| plane.effective(None, "llama", &none()).default_rate.get();
        plane.load_cluster(vec![(pool.clone(), level(0.5, 3))], &[], 2);
        assert_eq!(rate(&plane), 0.5);
        // Loaded again (NATS came back) with that level no longer valid: it stays as it was,
        plane.load_cluster(vec![], std::slice::from_ref(&pool), 10);
        assert_eq!(rate(&plane), 0.5);
        assert!(plane.effective(None, "llama", &none()).version >= 10);
        // unless the cluster has a valid one after all,
        plane.load_cluster(
            vec![(pool.clone(), level(0.25, 11))],
            std::slice::from_ref(&pool),
            12,
        );
        assert_eq!(rate(&plane), 0.25);
        // while a level the cluster no longer has goes.
        plane.load_cluster(vec![], &[], 13);
        assert_eq!(rate(&plane), 1.0);
    }

    fn goal(per_second: f64) -> EventRate {
        EventRate::per_second(per_second).unwrap()
    }

    fn target(per_second: f64, start: f64) -> Change {
        Change::Target {
            goal: goal(per_second),
            start: rate(start),
        }
    }

    #[test]
    fn a_target_starts_from_the_current_rate_and_is_steered_only_while_in_force() {
        let mut layer = Layer::default();
        apply_change(&mut layer, &target(60.0, 0.5), 3);
        assert_eq!(layer.target_in_force(), Some((goal(60.0), rate(0.5))));
        assert_eq!(merge([&layer], 3).default_rate.get(), 0.5);
        assert!(steer_layer(&mut layer, rate(0.5), rate(0.1), 4));
        assert_eq!(layer.target_in_force(), Some((goal(60.0), rate(0.1))));
        assert_eq!(layer.version, 4);
        assert_eq!(
            layer.sampling_rate.as_ref().unwrap().version,
            3,
            "as new as the command that set the target"
        );
        // The controller looked before a change: its choice is dropped.
        assert!(!steer_layer(&mut layer, rate(0.5), rate(0.2), 5));
        // A new goal goes on from the rate chosen so far, not from the start given.
        apply_change(&mut layer, &target(30.0, 1.0), 6);
        assert_eq!(layer.target_in_force(), Some((goal(30.0), rate(0.1))));
        assert_eq!(layer.to_wire().target_events_per_second, Some(30.0));
    }

    #[test]
    fn a_fixed_rate_ends_the_target_and_other_changes_leave_it() {
        let mut layer = Layer::default();
        apply_change(&mut layer, &target(60.0, 1.0), 1);
        let rule = Change::Sampling {
            rate: rate(0.5),
            patterns: vec![bridge_proto::pattern::Pattern::parse("a.*").unwrap()],
        };
        apply_change(&mut layer, &rule, 2);
        apply_change(&mut layer, &Change::Toggle(true), 3);
        let filter = Change::Filter {
            allow: vec![],
            block: vec![],
        };
        apply_change(&mut layer, &filter, 4);
        assert_eq!(layer.target_in_force(), Some((goal(60.0), rate(1.0))));
        apply_change(&mut layer, &sampling(0.2), 5);
        assert_eq!(layer.target, None);
        assert_eq!(layer.sampling_rate.as_ref().unwrap().value.get(), 0.2);
        assert!(!steer_layer(&mut layer, rate(0.2), rate(0.1), 6));

        apply_change(&mut layer, &target(60.0, 1.0), 7);
        apply_change(&mut layer, &Change::Reset, 8);
        assert!(layer.is_empty());
    }

    #[test]
    fn a_timed_fixed_rate_suspends_the_target_until_both_come_back() {
        let mut layer = Layer::default();
        apply_change(&mut layer, &target(60.0, 1.0), 1);
        steer_layer(&mut layer, rate(1.0), rate(0.1), 2);
        apply_timed_change(&mut layer, &sampling(0.9), 3, Some(1_000));
        assert_eq!(layer.target_in_force(), None, "suspended");
        assert_eq!(layer.to_wire().target_events_per_second, None);
        let wire = timed::to_wire(&layer, 0);
        let entry = wire.iter().find(|t| t.setting == "target").unwrap();
        assert_eq!(entry.reverts_to.as_deref(), Some("60/s"));
        // Another timed rate keeps what the first one suspended.
        apply_timed_change(&mut layer, &sampling(0.8), 4, Some(2_000));
        assert_eq!(timed::earliest(&layer), Some(2_000));
        let reverted: Vec<_> = timed::revert_due(&mut layer, 2_000)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            reverted,
            ["sampling_rate back to 0.1", "target back to 60/s"]
        );
        assert_eq!(layer.target_in_force(), Some((goal(60.0), rate(0.1))));

        // An untimed fixed rate over a suspended target ends it for good.
        apply_timed_change(&mut layer, &sampling(0.9), 5, Some(3_000));
        apply_change(&mut layer, &sampling(0.3), 6);
        assert_eq!(layer.target, None);
        assert!(timed::revert_due(&mut layer, u64::MAX).is_empty());
    }

    #[test]
    fn targets_are_stored_suspended_or_not_and_validated_on_load() {
        let mut layer = Layer::default();
        apply_change(&mut layer, &target(60.0, 0.25), 1);
        let json = serde_json::to_string(&layer).unwrap();
        assert!(
            json.contains(r#""target":{"value":60.0,"version":1}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Layer>(&json).unwrap(), layer);
        apply_timed_change(&mut layer, &sampling(0.9), 2, Some(1_700_000_000_000));
        let json = serde_json::to_string(&layer).unwrap();
        assert!(json.contains(r#""target":{"value":null"#), "{json}");
        assert_eq!(serde_json::from_str::<Layer>(&json).unwrap(), layer);
        for bad in ["0", "-5", "1e10"] {
            let json = format!(r#"{{"target":{{"value":{bad},"version":1}},"version":1}}"#);
            let err = serde_json::from_str::<Layer>(&json)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("target: target rate"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn workers_show_the_target_of_the_level_that_decides_their_rate() {
        let dir = tempfile::tempdir().unwrap();
        let plane = ControlPlane::open(&ControlConfig::default(), dir.path(), false).unwrap();
        let pool = Selector::Pool("llama".into());
        plane.apply(&pool, &target(60.0, 1.0)).await.unwrap();
        let shown = |id: &str| {
            plane
                .target_for(Some(id), "llama", &none())
                .map(EventRate::get)
        };
        assert_eq!(shown("gpu-1"), Some(60.0));
        assert_eq!(
            plane.target_levels(),
            [(pool.clone(), goal(60.0), rate(1.0))]
        );
        let gpu_1 = Selector::Worker("gpu-1".into());
        plane.apply(&gpu_1, &sampling(0.5)).await.unwrap();
        assert_eq!(shown("gpu-1"), None, "its own newer rate decides");
        assert_eq!(shown("gpu-2"), Some(60.0));
        assert!(
            plane
                .steer(&pool, rate(1.0), rate(0.1))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            plane
                .effective(Some("gpu-1"), "llama", &none())
                .default_rate
                .get(),
            0.5,
            "a rate set at a worker after the target still decides for it"
        );
        assert_eq!(shown("gpu-1"), None);
        assert_eq!(
            plane
                .effective(Some("gpu-2"), "llama", &none())
                .default_rate
                .get(),
            0.1
        );
        assert!(
            plane
                .steer(&pool, rate(1.0), rate(0.2))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn config_levels_are_validated_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ControlConfig::default();
        config.pools.insert(
            "llama".into(),
            LayerConfig {
                allow: Some(vec!["inference.>".into(), "gpu..util".into()]),
                ..Default::default()
            },
        );
        let err = ControlPlane::open(&config, dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("control.pools.llama.allow[1]: `gpu..util` has an empty token"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_failed_save_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let plane = ControlPlane::open(&ControlConfig::default(), dir.path(), false).unwrap();
        let before = plane.effective(None, "", &none());
        // Replace the directory with a file so that the next save cannot create its temp file.
        std::fs::remove_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path(), b"").unwrap();
        let err = plane
            .apply(&Selector::All, &sampling(0.1))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("cannot write control state"),
            "{err}"
        );
        assert_eq!(plane.effective(None, "", &none()), before);
        std::fs::remove_file(dir.path()).unwrap();
    }
}
