//! Events across hubs.
//!
//! Each hub publishes every event it passes on to `<prefix>.events.<pool>.<worker>.<event
//! name>` (pool and worker as [`subject_token`]s), with the encoded delivery its own subscribers
//! get as the payload (it carries the time the hub received the event): the `Publisher` is one
//! of the hub's outputs. For each local subscription the hub subscribes to the subjects its
//! filter maps to, so NATS does the matching, and hands what other hubs published to its
//! outputs through the same door as local events, addressed to the subscriptions it was
//! received for (same queues, same lag notices). The connection is made with `no_echo`, so NATS never sends a
//! hub its own messages: its own subscribers got them directly. Publishing never waits: when
//! NATS is slow or away the backlog is bounded and what does not fit is counted, while local
//! delivery goes on.

use std::{
    borrow::Cow,
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
};

use bridge_proto::encoded::EncodedSubscribeResponse;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{ClusterLink, token};
use crate::outputs::{
    Delivery, Origin, Output,
    subscribers::{Filter, SubscriberId},
};

/// Events waiting for the NATS connection; beyond this they are dropped and counted.
pub(super) const BACKLOG: usize = 65_536;
/// Events the publisher takes from the backlog at a time.
const BATCH: usize = 256;

/// One event on its way to NATS.
#[derive(Debug)]
pub struct Outbound {
    pub subject: String,
    pub response: EncodedSubscribeResponse,
}

impl ClusterLink {
    /// The subject of an event from `worker` in `pool`.
    pub fn subject<'a>(
        &self,
        pool: &str,
        worker: &str,
        parts: impl Iterator<Item = &'a str>,
    ) -> String {
        let mut subject = format!(
            "{}.events.{}.{}",
            self.prefix,
            subject_token(pool),
            subject_token(worker)
        );
        for part in parts {
            subject.push('.');
            subject.push_str(part);
        }
        subject
    }

    /// The output that publishes this hub's events to the cluster.
    pub fn publisher(self: &Arc<Self>) -> Arc<dyn Output> {
        Arc::new(Publisher { link: self.clone() })
    }

    /// Hands the events other hubs publish that match `filter` to the outputs, for subscription
    /// `id`, until `closed` completes. Local subscriptions whose filters map to the same subject
    /// share one NATS subscription, and each message on it is decoded once however many of them
    /// receive it.
    pub fn mirror(
        self: &Arc<Self>,
        id: SubscriberId,
        filter: &Filter,
        closed: impl Future<Output = ()> + Send + 'static,
    ) {
        let subjects = subjects(&self.prefix, filter);
        {
            let mut mirrors = self.mirrors();
            for subject in &subjects {
                match mirrors.get(subject) {
                    Some(mirror) => mirror.add(id),
                    None => {
                        let mirror = Arc::new(Mirror::default());
                        mirror.add(id);
                        mirrors.insert(subject.clone(), mirror.clone());
                        tokio::spawn(self.clone().run_mirror(subject.clone(), mirror));
                    }
                }
            }
        }
        let link = self.clone();
        tokio::spawn(async move {
            closed.await;
            let mut mirrors = link.mirrors();
            for subject in &subjects {
                let Some(mirror) = mirrors.get(subject) else {
                    continue;
                };
                let mut sharing = mirror.lock();
                sharing.retain(|s| *s != id);
                if sharing.is_empty() {
                    // Under the map's lock: a mirror still in the map is never done.
                    mirror.done.cancel();
                    drop(sharing);
                    mirrors.remove(subject);
                }
            }
        });
    }

    fn mirrors(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mirror>>> {
        self.mirrors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One NATS subscription, until no local subscriber needs it.
    async fn run_mirror(self: Arc<Self>, subject: String, mirror: Arc<Mirror>) {
        let mut messages = match self.client.subscribe(subject.clone()).await {
            Ok(messages) => messages,
            Err(error) => {
                warn!(%subject, %error, "cluster: cannot subscribe; these subscribers see local events only");
                return;
            }
        };
        loop {
            tokio::select! {
                () = mirror.done.cancelled() => break,
                message = messages.next() => {
                    let Some(message) = message else { break };
                    self.deliver(&mirror, message);
                }
            }
        }
        // Dropping the subscription unsubscribes.
    }

    fn deliver(&self, mirror: &Mirror, message: async_nats::Message) {
        let Some((pool, worker, name)) = parse_subject(&self.prefix, &message.subject) else {
            return;
        };
        let Some(checked) = EncodedSubscribeResponse::checked_delivery(message.payload) else {
            debug!(subject = %message.subject, "cluster: skipping a message that is not an event delivery");
            return;
        };
        self.received.fetch_add(1, Relaxed);
        // Held while the outputs take the event: none of them waits, and a copy per event
        // would cost an allocation each.
        let subscribers = mirror.lock();
        self.outputs.publish(&Delivery::from_other_hub(
            &worker,
            &pool,
            name,
            checked.trace_id,
            checked.response,
            checked.received_ns,
            &subscribers,
        ));
    }
}

/// This hub's events on their way to NATS: an output.
#[derive(Debug)]
struct Publisher {
    link: Arc<ClusterLink>,
}

impl Output for Publisher {
    /// Queues the hub's own events for the publisher task; never waits. The subject and bytes
    /// are only made when the backlog has room, so an overloaded or cut-off hub does not encode
    /// what it would drop.
    fn offer(&self, delivery: &Delivery<'_>) {
        if !matches!(delivery.origin, Origin::Local) {
            return;
        }
        let link = &self.link;
        match link.outbound.try_reserve() {
            Ok(slot) => slot.send(Outbound {
                subject: link.subject(delivery.pool, delivery.worker_id, delivery.parts()),
                response: delivery.encoded().clone(),
            }),
            Err(_) => {
                link.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// The local subscribers that share one NATS subscription.
#[derive(Debug, Default)]
pub(super) struct Mirror {
    subscribers: Mutex<Vec<SubscriberId>>,
    /// Cancelled when the last of them has gone.
    done: CancellationToken,
}

impl Mirror {
    /// Adds a subscription, keeping the list in id order (as `Origin::OtherHub` wants it).
    fn add(&self, id: SubscriberId) {
        let mut ids = self.lock();
        let at = ids.partition_point(|known| *known < id);
        ids.insert(at, id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SubscriberId>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) async fn publish(link: Arc<ClusterLink>, mut backlog: mpsc::Receiver<Outbound>) {
    let mut batch = Vec::with_capacity(BATCH);
    while backlog.recv_many(&mut batch, BATCH).await > 0 {
        for event in batch.drain(..) {
            let payload = event.response.as_bytes().clone();
            if link.client.publish(event.subject, payload).await.is_err() {
                link.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// A pool or worker id as one subject token: characters NATS gives a meaning to ('.', '*',
/// '>', whitespace), '~' and non-ASCII are written `~HH`; the empty string is `~`.
pub fn subject_token(text: &str) -> String {
    token::escape(text, b'~', |byte| {
        byte.is_ascii_graphic() && !matches!(byte, b'.' | b'*' | b'>')
    })
}

/// The inverse of [`subject_token`]; `None` for a token it cannot have written.
pub fn parse_token(token: &str) -> Option<Cow<'_, str>> {
    token::unescape(token, b'~')
}

/// Pool, worker and event name (dotted) of an event subject.
fn parse_subject<'a>(
    prefix: &str,
    subject: &'a str,
) -> Option<(Cow<'a, str>, Cow<'a, str>, &'a str)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix(".events.")?;
    let mut tokens = rest.splitn(3, '.');
    let pool = parse_token(tokens.next()?)?;
    let worker = parse_token(tokens.next()?)?;
    let name = tokens.next().filter(|name| !name.is_empty())?;
    Some((pool, worker, name))
}

/// The subjects that carry the events `filter` matches, without overlap (NATS would deliver an
/// event once per matching subscription): one per worker named (or any), with the pattern when
/// there is one, or every name when there are several (they may overlap; the filter is checked
/// again on arrival).
fn subjects(prefix: &str, filter: &Filter) -> Vec<String> {
    let pool = filter
        .pool
        .as_deref()
        .map_or_else(|| "*".to_owned(), subject_token);
    let event = match filter.patterns.as_slice() {
        [one] => one.as_str().to_owned(),
        _ => ">".to_owned(),
    };
    let mut workers: Vec<String> = filter.worker_ids.iter().map(|w| subject_token(w)).collect();
    if workers.is_empty() {
        workers.push("*".into());
    }
    workers.sort();
    workers
        .into_iter()
        .map(|worker| format!("{prefix}.events.{pool}.{worker}.{event}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use bridge_proto::pattern::Pattern;

    use super::*;

    #[test]
    fn tokens_round_trip_and_never_contain_subject_syntax() {
        for text in [
            "gpu-3",
            "",
            "a.b",
            "x*y>z",
            "tilde~",
            "two words",
            "ünï",
            "_",
        ] {
            let token = subject_token(text);
            assert!(!token.contains(['.', '*', '>', ' ']), "{token}");
            assert!(!token.is_empty());
            assert_eq!(parse_token(&token).as_deref(), Some(text), "{token}");
        }
        assert_eq!(subject_token("gpu-3"), "gpu-3");
        assert_eq!(parse_token("~4"), None);
        assert_eq!(parse_token("~ZZ"), None);
    }

    #[test]
    fn filters_map_onto_subjects_nats_can_match() {
        let filter = Filter {
            patterns: vec![Pattern::parse("inference.>").unwrap()],
            worker_ids: ["gpu-3".to_owned(), "a.b".to_owned()].into(),
            pool: Some("llama".into()),
            trace_id: None,
            metadata: Vec::new(),
            worker_labels: None,
        };
        assert_eq!(
            subjects("bridge", &filter),
            [
                "bridge.events.llama.a~2Eb.inference.>",
                "bridge.events.llama.gpu-3.inference.>"
            ]
        );
        let everything = Filter::default();
        assert_eq!(subjects("b", &everything), ["b.events.*.*.>"]);
        let two = Filter {
            patterns: vec![
                Pattern::parse("a.>").unwrap(),
                Pattern::parse("a.b").unwrap(),
            ],
            ..Default::default()
        };
        assert_eq!(subjects("b", &two), ["b.events.*.*.>"]);
        assert_eq!(
            parse_subject("b", "b.events.~.gpu~2E1.inference.stop"),
            Some(("".into(), "gpu.1".into(), "inference.stop"))
        );
        assert_eq!(parse_subject("b", "b.events.~.w"), None);
    }
}
