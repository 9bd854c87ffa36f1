//! Desired control state shared by every hub, in a JetStream key-value bucket.
//!
//! One key per level: `global`, `pool.<name>`, `label.<labels>` (their canonical text,
//! `zone=a,rack=3`), `worker.<id>`, each holding that level's [`Layer`] as JSON. A change reads its level, applies itself and writes the level back only
//! if nobody wrote it in between (optimistic concurrency on the key's revision), so concurrent
//! commands on different hubs never lose one another.
//!
//! Versions are the bucket's revisions. They grow across all keys, so they order changes made
//! on any hub, as the single hub's version counter did. A setting cannot know the revision it
//! will be written at, so the settings a write changes carry version 0 in the bucket, read as
//! "the revision of this entry".
//!
//! Every hub follows the bucket: it loads every level when it connects (replacing what it
//! held, so that it also learns of levels removed while it was away), then applies each change
//! to its own workers as it arrives. It keeps a copy on disk, so that a hub restarted
//! while NATS is away still gives its workers the operators' settings rather than
//! `config.toml`'s alone.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bridge_proto::{labels::LabelSet, sampling::Rate};
use futures_util::StreamExt;
use tracing::{info, warn};

use super::{ClusterLink, LocalHub, token};
use crate::{
    command::{Change, Selector},
    control::{
        apply_timed_change,
        layer::Layer,
        steer_layer,
        timed::{self, Reverted},
    },
    error::{Error, Result},
};

/// The key whose writes give each hub start a fresh version (its epoch).
const EPOCH_KEY: &str = "epoch";
/// A hub that stops refreshing its presence is forgotten after this long.
pub(super) const PRESENCE_TTL: Duration = Duration::from_secs(15);
const PRESENCE_EVERY: Duration = Duration::from_secs(5);
/// Concurrent writes to one level that a change retries before giving up.
const WRITE_ATTEMPTS: usize = 32;

/// The cluster's buckets.
#[derive(Debug, Clone)]
pub struct Buckets {
    /// Desired control state.
    pub control: kv::Store,
    /// One key per hub that is up, refreshed while it is.
    pub hubs: kv::Store,
}

/// The key of a level.
pub fn layer_key(selector: &Selector) -> String {
    match selector {
        Selector::All => "global".into(),
        Selector::Pool(pool) => format!("pool.{}", key_token(pool)),
        Selector::Worker(id) => format!("worker.{}", key_token(id)),
        Selector::Labels(set) => format!("label.{}", key_token(&set.canonical())),
    }
}

/// The level a key names; `None` for keys that are not levels.
fn parse_layer_key(key: &str) -> Option<Selector> {
    match key.split_once('.') {
        None if key == "global" => Some(Selector::All),
        Some(("pool", token)) => parse_key_token(token).map(Selector::Pool),
        Some(("worker", token)) => parse_key_token(token).map(Selector::Worker),
        Some(("label", token)) => parse_key_token(token)
            .and_then(|text| LabelSet::parse_canonical(&text).ok())
            .map(Selector::Labels),
        _ => None,
    }
}

/// Text as one key token: key-value keys allow letters, digits, '-', '_', '=' and '/' ('.'
/// separates tokens), so every other byte, and '=', is written `=HH`; the empty string is `=`.
pub fn key_token(text: &str) -> String {
    token::escape(text, b'=', |byte| {
        byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_')
    })
}

/// The inverse of [`key_token`]; `None` for a token it cannot have written.
pub fn parse_key_token(token: &str) -> Option<String> {
    token::unescape(token, b'=').map(std::borrow::Cow::into_owned)
}

/// A level as stored at `revision`, its pending versions resolved (see the module notes).
fn read_layer(value: &[u8], revision: u64) -> Result<Layer, serde_json::Error> {
    let mut layer: Layer = if value.is_empty() {
        Layer::default()
    } else {
        serde_json::from_slice(value)?
    };
    let resolve = |version: &mut u64| {
        if *version == 0 {
            *version = revision;
        }
    };
    resolve(&mut layer.version);
    if let Some(s) = &mut layer.enabled {
        resolve(&mut s.version);
    }
    if let Some(s) = &mut layer.sampling_rate {
        resolve(&mut s.version);
    }
    if let Some(s) = &mut layer.filter {
        resolve(&mut s.version);
    }
    if let Some(s) = &mut layer.target {
        resolve(&mut s.version);
    }
    for s in layer.rules.values_mut() {
        resolve(&mut s.version);
    }
    Ok(layer)
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!(
        "cluster control state: {what}: {error} (changes need NATS JetStream; events still flow locally)"
    ))
}

/// Writes `change` to its level, reverting at `until` (Unix milliseconds) when timed; returns
/// the revision, which is the change's version.
pub async fn write(
    control: &kv::Store,
    selector: &Selector,
    change: &Change,
    until: Option<u64>,
) -> Result<u64> {
    let written = update_layer(control, selector, change == &Change::Reset, |layer| {
        apply_timed_change(layer, change, 0, until);
        Some(())
    })
    .await?;
    Ok(written.map_or(0, |(revision, ())| revision))
}

/// Reverts the settings of a level that are due at `now_ms` (see `control::timed`): the level
/// is written back only while it still holds them, so that hubs racing to revert it do so once,
/// and a change made in between is never undone. Returns the revision and what was reverted;
/// `None` when nothing was due any more.
pub async fn revert(
    control: &kv::Store,
    selector: &Selector,
    now_ms: u64,
) -> Result<Option<(u64, Vec<Reverted>)>> {
    update_layer(control, selector, false, |layer| {
        let reverted = timed::revert_due(layer, now_ms);
        // The revert is a change of the level: its workers are pushed the result.
        layer.version = 0;
        (!reverted.is_empty()).then_some(reverted)
    })
    .await
}

/// Sets the rate the controller chose for a level under a target (see `steering`): written
/// only while the level still has the target and the rate `from`, so that a command made in
/// between wins. Returns the revision; `None` when the level changed.
pub async fn steer(
    control: &kv::Store,
    selector: &Selector,
    from: Rate,
    to: Rate,
) -> Result<Option<u64>> {
    let written = update_layer(control, selector, false, |layer| {
        steer_layer(layer, from, to, 0).then_some(())
    })
    .await?;
    Ok(written.map(|(revision, ())| revision))
}

/// Whether this hub is the one that steers the cluster's target rates: the one whose node name
/// is the smallest among the hubs that are up, so that hubs do not fight over a level's rate.
/// `false` while it cannot tell who is up.
pub fn steers(link: &ClusterLink) -> bool {
    link.peers()
        .is_some_and(|peers| peers.iter().all(|peer| peer.as_str() > link.node()))
}

/// Reads a level, lets `edit` change it, and writes it back unless another hub wrote it in
/// between (then again from the top). `edit` returning `None` writes nothing. `replace_invalid`:
/// a level that is not valid is edited as an empty one, not refused.
async fn update_layer<T>(
    control: &kv::Store,
    selector: &Selector,
    replace_invalid: bool,
    mut edit: impl FnMut(&mut Layer) -> Option<T>,
) -> Result<Option<(u64, T)>> {
    let key = layer_key(selector);
    for _ in 0..WRITE_ATTEMPTS {
        let entry = control
            .entry(key.clone())
            .await
            .map_err(|e| unavailable("read", e))?;
        let (mut layer, expected) = match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let layer = match read_layer(&entry.value, entry.revision) {
                    Ok(layer) => layer,
                    // A reset needs nothing of what the level holds: it is the way out of a
                    // level that is not valid (every hub refuses it and keeps the one before).
                    Err(_) if replace_invalid => Layer::default(),
                    Err(e) => {
                        return Err(Error::Internal(format!(
                            "cluster control state `{key}` is not valid: {e}; a reset of {selector} replaces it"
                        )));
                    }
                };
                (layer, Some(entry.revision))
            }
            Some(entry) => (Layer::default(), Some(entry.revision)),
            None => (Layer::default(), None),
        };
        let Some(outcome) = edit(&mut layer) else {
            return Ok(None);
        };
        let value = serde_json::to_vec(&layer)
            .map_err(|e| Error::Internal(e.to_string()))?
            .into();
        let written = match expected {
            Some(revision) => control.update(&key, value, revision).await.map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            }),
            None => control.create(&key, value).await.map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            }),
        };
        match written {
            Ok(revision) => return Ok(Some((revision, outcome))),
            // Another hub wrote this level in between: read it again.
            Err((true, _)) => {}
            Err((false, error)) => return Err(unavailable("write", error)),
        }
    }
    Err(unavailable(
        "write",
        format!("`{key}` kept changing under {WRITE_ATTEMPTS} attempts"),
    ))
}

fn bucket_name(prefix: &str, what: &str) -> String {
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}_{what}")
}

/// Opens a bucket, creating it when it does not exist yet. The stream is made here rather than
/// by `create_key_value`, which first reads account information in a shape older servers
/// (nats-server 2.9, Debian's) do not send.
async fn open_bucket(
    js: &jetstream::Context,
    bucket: String,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    let stream = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    };
    let created = js.get_or_create_stream(stream).await;
    // Whether this hub or another created it, it is there now.
    js.get_key_value(&bucket)
        .await
        .map_err(|error| match created {
            Err(create) => format!("bucket {bucket}: {create}"),
            Ok(_) => format!("bucket {bucket}: {error}"),
        })
}

/// Follows the cluster's control state for as long as the hub runs, reconnecting as needed.
pub(super) async fn follow(hub: impl LocalHub, link: std::sync::Arc<ClusterLink>) {
    let mut last_error = String::new();
    loop {
        let followed = follow_once(&hub, &link).await;
        link.applied_revision.send_replace(0);
        match followed {
            Ok(()) => last_error.clear(),
            // While NATS is away every attempt fails the same way; say it once.
            Err(error) if error != last_error => {
                warn!(%error, "cluster: not following the control state; retrying");
                last_error = error;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = hub.shutdown().cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn follow_once(hub: &impl LocalHub, link: &ClusterLink) -> Result<(), String> {
    let js = jetstream::new(link.client.clone());
    let control = open_bucket(
        &js,
        bucket_name(&link.prefix, "control"),
        "telemetry-bridge: desired control state",
        Duration::ZERO,
        link.replicas,
    )
    .await?;
    let hubs = open_bucket(
        &js,
        bucket_name(&link.prefix, "hubs"),
        "telemetry-bridge: hubs that are up",
        PRESENCE_TTL,
        link.replicas,
    )
    .await?;
    let node = key_token(link.node());
    hubs.put(&node, link.node().as_bytes().to_vec().into())
        .await
        .map_err(|e| e.to_string())?;
    link.buckets.send_replace(Some(Buckets {
        control: control.clone(),
        hubs: hubs.clone(),
    }));
    // Loaded state may be older than what this hub already pushed from its copy on disk;
    // a fresh epoch puts every state from now on above both.
    let epoch = control
        .put(EPOCH_KEY, link.node().as_bytes().to_vec().into())
        .await
        .map_err(|e| e.to_string())?;
    let mut entries = control
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    let mut members = hubs
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    let mut presence = tokio::time::interval(PRESENCE_EVERY);
    let mut loaded = false;
    let mut initial = Vec::new();
    let mut refused = Vec::new();
    loop {
        let entry = tokio::select! {
            () = hub.shutdown().cancelled() => {
                let _ = hubs.purge(&node).await;
                return Ok(());
            }
            _ = presence.tick() => {
                hubs.put(&node, link.node().as_bytes().to_vec().into())
                    .await
                    .map_err(|e| e.to_string())?;
                continue;
            }
            member = members.next() => {
                let member = member
                    .ok_or("the hubs watch ended")?
                    .map_err(|e| e.to_string())?;
                link.saw_member(&member);
                continue;
            }
            entry = entries.next() => entry,
        };
        let entry = entry
            .ok_or("the control state watch ended")?
            .map_err(|e| e.to_string())?;
        if entry.key == EPOCH_KEY {
            if !loaded && entry.revision >= epoch {
                // Everything written before this hub's start has arrived.
                loaded = true;
                hub.load_cluster_state(std::mem::take(&mut initial), &refused, epoch)
                    .await;
                info!(
                    control.version = epoch,
                    "cluster: control state loaded; following it"
                );
                link.applied_revision.send_replace(entry.revision);
            }
            continue;
        }
        let Some(selector) = parse_layer_key(&entry.key) else {
            continue;
        };
        let value = match entry.operation {
            kv::Operation::Put => entry.value.as_ref(),
            // Removed by hand (`nats kv del`): the level has no settings.
            kv::Operation::Delete | kv::Operation::Purge => &[],
        };
        match read_layer(value, entry.revision) {
            Ok(layer) if loaded => {
                hub.apply_cluster_layer(&selector, layer).await;
                link.applied_revision.send_replace(entry.revision);
            }
            Ok(layer) => initial.push((selector, layer)),
            // Written by hand, or by a hub that validates less: applying the rest of it could
            // turn an allow list with one bad pattern into no filter at all, so none of it is.
            Err(error) => {
                warn!(
                    key = %entry.key,
                    revision = entry.revision,
                    %error,
                    "cluster: refusing a control level that is not valid; its previous settings stay in force"
                );
                if !loaded {
                    refused.push(selector);
                }
            }
        }
    }
}

impl ClusterLink {
    /// The buckets, or the error a command gets while they are out of reach.
    pub fn buckets(&self) -> Result<Buckets> {
        match &*self.buckets.borrow() {
            Some(buckets) if self.connected() => Ok(buckets.clone()),
            _ => Err(unavailable("unreachable", "not connected to NATS")),
        }
    }

    /// Waits until this hub has applied `revision` of the control state, up to `deadline`.
    pub async fn applied(&self, revision: u64, deadline: tokio::time::Instant) -> bool {
        let mut applied = self.applied_revision.subscribe();
        tokio::time::timeout_at(deadline, applied.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Notes a hub's presence (a put, refreshed every few seconds) or departure.
    fn saw_member(&self, entry: &kv::Entry) {
        let Some(node) = parse_key_token(&entry.key) else {
            return;
        };
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        if entry.operation == kv::Operation::Put {
            members.insert(node, std::time::Instant::now());
        } else {
            members.remove(&node);
        }
    }

    /// The other hubs that are up, by name; `None` while this hub cannot tell.
    pub fn peers(&self) -> Option<Vec<String>> {
        if !self.following() || !self.connected() {
            return None;
        }
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        // The bucket forgets a hub that stopped refreshing, without telling its watchers.
        members.retain(|_, seen| seen.elapsed() < PRESENCE_TTL);
        Some(
            members
                .keys()
                .filter(|node| *node != self.node())
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::apply_change;

    #[test]
    fn key_tokens_round_trip_and_are_valid_keys() {
        for text in ["gpu-3", "", "a.b", "x*y>z", "eq=", "two words", "ünï", "_"] {
            let token = key_token(text);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{token}"
            );
            assert_eq!(parse_key_token(&token).as_deref(), Some(text), "{token}");
        }
        assert_eq!(
            layer_key(&Selector::Worker("gpu.3".into())),
            "worker.gpu=2E3"
        );
        assert_eq!(
            parse_layer_key("pool.llama"),
            Some(Selector::Pool("llama".into()))
        );
        assert_eq!(parse_layer_key("global"), Some(Selector::All));
        assert_eq!(parse_layer_key(EPOCH_KEY), None);
        assert_eq!(parse_key_token("=4"), None);
    }

    /// Label values hold characters keys cannot (spaces, `=`, `,`, `%`, `.`): every valid set
    /// makes a valid key that reads back into the same set.
    #[test]
    fn label_levels_round_trip_through_keys() {
        for items in [
            &["zone=us-east1-b"][..],
            &["zone=a", "rack=r 3.1"],
            &["a=x,y=z", "b=100%", "c=~!@#$^&*()[]{}<>?/\\|'\"`", "d=.>*"],
        ] {
            let set = LabelSet::parse_items(items.iter().copied()).unwrap();
            let key = layer_key(&Selector::Labels(set.clone()));
            let token = key.strip_prefix("label.").unwrap();
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{key}"
            );
            assert_eq!(parse_layer_key(&key), Some(Selector::Labels(set)), "{key}");
        }
        assert_eq!(
            layer_key(&Selector::Labels(
                LabelSet::parse_items(["zone=us-east1-b"]).unwrap()
            )),
            "label.zone=3Dus-east1-b"
        );
        // Text that is not a valid set is not a level.
        assert_eq!(parse_layer_key("label.Zone=3Da"), None);
    }

    #[test]
    fn settings_written_by_an_entry_take_its_revision() {
        let mut layer = read_layer(b"", 3).unwrap();
        assert_eq!(layer.version, 3);
        let rate = |r| Change::Sampling {
            rate: Rate::new(r).unwrap(),
            patterns: vec![],
        };
        apply_change(&mut layer, &rate(0.5), 0);
        let stored = serde_json::to_vec(&layer).unwrap();
        let read = read_layer(&stored, 9).unwrap();
        assert_eq!(read.sampling_rate.as_ref().map(|s| s.version), Some(9));
        assert_eq!(read.version, 9);
        // A later change to another setting keeps this one's version.
        let mut again = read.clone();
        apply_change(&mut again, &Change::Toggle(false), 0);
        let read = read_layer(&serde_json::to_vec(&again).unwrap(), 12).unwrap();
        assert_eq!(read.sampling_rate.map(|s| s.version), Some(9));
        assert_eq!(read.enabled.map(|s| s.version), Some(12));
        assert!(read_layer(b"{ nope", 1).is_err());
        let typo = br#"{"filter":{"value":{"allow":["a..b"],"block":[]},"version":0},"version":0}"#;
        let err = read_layer(typo, 3).unwrap_err().to_string();
        assert!(err.starts_with("filter.allow[0]: `a..b`"), "{err}");
    }
}
