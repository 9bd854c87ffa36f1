//! Questions one hub asks all the others: which workers they serve, and whether those workers
//! applied a control change.
//!
//! A request goes to `<prefix>.rpc.<question>` with a reply inbox; every other hub answers
//! with its name in a header, so the asker stops waiting as soon as every hub that is up (the
//! hubs bucket) has answered, and no later than its deadline. The asker answers for itself
//! directly: its connection does not receive its own messages (`no_echo`).

use std::{collections::HashSet, sync::Arc, time::Duration};

use async_nats::HeaderMap;
use bridge_proto::v1;
use futures_util::StreamExt;
use prost::Message as _;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::ClusterLink;
use super::LocalHub;
use crate::command::Selector;

const NODE_HEADER: &str = "Bridge-Node";
const VERSION_HEADER: &str = "Bridge-Version";
const ACKS: &str = "rpc.acks";
const WORKERS: &str = "rpc.workers";
/// How long a hub waits for the others' worker lists.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(2);
/// Added to a command's wait for the answers to travel back.
pub const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// Answers other hubs' questions until the hub shuts down.
pub(super) async fn serve(hub: impl LocalHub, link: Arc<ClusterLink>) {
    let subscribed = async {
        let acks = link.client.subscribe(link.scoped(ACKS)).await?;
        let workers = link.client.subscribe(link.scoped(WORKERS)).await?;
        Ok::<_, async_nats::SubscribeError>((acks, workers))
    };
    let (mut acks, mut workers) = match subscribed.await {
        Ok(subscriptions) => subscriptions,
        Err(error) => {
            warn!(%error, "cluster: cannot answer other hubs; commands on them will not reach this hub's workers");
            return;
        }
    };
    loop {
        tokio::select! {
            () = hub.shutdown().cancelled() => return,
            Some(message) = acks.next() => {
                tokio::spawn(answer_acks(hub.clone(), link.clone(), message));
            }
            Some(message) = workers.next() => answer_workers(&hub, &link, message).await,
            else => return,
        }
    }
}

async fn answer_acks(hub: impl LocalHub, link: Arc<ClusterLink>, message: async_nats::Message) {
    let Some(reply) = message.reply else { return };
    let version = message
        .headers
        .as_ref()
        .and_then(|h| h.get(VERSION_HEADER))
        .and_then(|v| v.as_str().parse::<u64>().ok());
    let request = v1::UpdateControlRequest::decode(message.payload);
    let (Some(version), Ok(request)) = (version, request) else {
        debug!("cluster: ignoring a malformed acknowledgement request");
        return;
    };
    let Ok(selector) = Selector::try_from(request.selector) else {
        return;
    };
    let wait = Duration::from_millis(request.wait_ms.into());
    let targets = hub.local_acknowledgements(&selector, version, wait).await;
    let answer = v1::UpdateControlResponse {
        version,
        targets,
        unanswered_hubs: Vec::new(),
        expires_at_ms: 0,
    };
    respond(&link, reply, answer.encode_to_vec()).await;
}

async fn answer_workers(hub: &impl LocalHub, link: &ClusterLink, message: async_nats::Message) {
    let Some(reply) = message.reply else { return };
    let Ok(request) = v1::ListWorkersRequest::decode(message.payload) else {
        debug!("cluster: ignoring a malformed worker list request");
        return;
    };
    let selector = match request.selector.map(|s| Selector::try_from(Some(s))) {
        Some(Ok(selector)) => Some(selector),
        Some(Err(_)) => return,
        None => None,
    };
    let workers = hub.local_workers(selector.as_ref());
    respond(
        link,
        reply,
        v1::ListWorkersResponse {
            workers,
            unanswered_hubs: Vec::new(),
        }
        .encode_to_vec(),
    )
    .await;
}

async fn respond(link: &ClusterLink, reply: async_nats::Subject, payload: Vec<u8>) {
    let mut headers = HeaderMap::new();
    headers.insert(NODE_HEADER, link.node());
    if let Err(error) = link
        .client
        .publish_with_headers(reply, headers, payload.into())
        .await
    {
        debug!(%error, "cluster: could not answer another hub");
    }
}

/// The answers of the other hubs, and the hubs that did not answer ("*": cannot tell).
#[derive(Debug)]
struct Answers<T> {
    answers: Vec<T>,
    unanswered: Vec<String>,
}

/// Asks every other hub that is up; returns the answers that came by `deadline`.
async fn ask(
    link: &ClusterLink,
    question: &str,
    headers: HeaderMap,
    payload: Vec<u8>,
    deadline: Instant,
) -> Answers<bytes::Bytes> {
    let unknown = || Answers {
        answers: Vec::new(),
        unanswered: vec!["*".to_owned()],
    };
    let Some(peers) = link.peers() else {
        // `/readyz` and the connection's own log lines say that NATS is away; the answer says
        // that it is partial.
        debug!("cluster: cannot tell which hubs are up; answering for this hub alone");
        return unknown();
    };
    if peers.is_empty() {
        return Answers {
            answers: Vec::new(),
            unanswered: Vec::new(),
        };
    }
    let inbox = link.client.new_inbox();
    let Ok(mut replies) = link.client.subscribe(inbox.clone()).await else {
        return unknown();
    };
    if link
        .client
        .publish_with_reply_and_headers(link.scoped(question), inbox, headers, payload.into())
        .await
        .is_err()
    {
        return unknown();
    }
    let mut waiting: HashSet<String> = peers.into_iter().collect();
    let mut answers = Vec::with_capacity(waiting.len());
    while !waiting.is_empty() {
        let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await else {
            break;
        };
        let node = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(NODE_HEADER))
            .map(|v| v.as_str().to_owned());
        if node.is_some_and(|node| waiting.remove(&node)) {
            answers.push(reply.payload);
        }
    }
    if !waiting.is_empty() {
        warn!(hubs = ?waiting, question, "cluster: no answer from these hubs in time");
    }
    let mut unanswered: Vec<String> = waiting.into_iter().collect();
    unanswered.sort();
    Answers {
        answers,
        unanswered,
    }
}

impl Answers<bytes::Bytes> {
    /// Decodes each answer, dropping those that do not decode.
    fn decode<M: prost::Message + Default>(self) -> Answers<M> {
        Answers {
            answers: self
                .answers
                .into_iter()
                .filter_map(|answer| M::decode(answer).ok())
                .collect(),
            unanswered: self.unanswered,
        }
    }
}

impl ClusterLink {
    /// The workers other hubs serve (those `selector` addresses; all when `None`).
    pub async fn remote_workers(&self, selector: Option<&Selector>) -> v1::ListWorkersResponse {
        let request = v1::ListWorkersRequest {
            selector: selector.map(v1::Selector::from),
        };
        let answers = ask(
            self,
            WORKERS,
            HeaderMap::new(),
            request.encode_to_vec(),
            Instant::now() + LIST_TIMEOUT,
        )
        .await
        .decode::<v1::ListWorkersResponse>();
        v1::ListWorkersResponse {
            workers: answers
                .answers
                .into_iter()
                .flat_map(|answer| answer.workers)
                .collect(),
            unanswered_hubs: answers.unanswered,
        }
    }

    /// Waits for the other hubs' workers that `selector` addresses to apply `version`, as long
    /// as `wait`; returns their statuses, and the hubs that did not answer.
    pub async fn remote_acknowledgements(
        &self,
        selector: &Selector,
        version: u64,
        wait: Duration,
    ) -> v1::UpdateControlResponse {
        let request = v1::UpdateControlRequest {
            selector: Some(v1::Selector::from(selector)),
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            change: None,
            for_ms: 0,
        };
        let mut headers = HeaderMap::new();
        headers.insert(VERSION_HEADER, version.to_string().as_str());
        let answers = ask(
            self,
            ACKS,
            headers,
            request.encode_to_vec(),
            Instant::now() + wait + ANSWER_MARGIN,
        )
        .await
        .decode::<v1::UpdateControlResponse>();
        v1::UpdateControlResponse {
            version,
            targets: answers
                .answers
                .into_iter()
                .flat_map(|answer| answer.targets)
                .collect(),
            unanswered_hubs: answers.unanswered,
            expires_at_ms: 0,
        }
    }
}
