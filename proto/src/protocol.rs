//! The names and defaults every participant must agree on besides the message types: request
//! metadata, reserved event names, the counters workers report and the hub's drop reasons, the
//! GPU events the sidecar emits and `bridge top` reads, the span and inference conventions, and
//! the default outage buffer.
//!
//! Each is defined here once; the hub, the worker library, the sidecar and the tests use these
//! constants. `bridge.proto` documents them, and the tests below check that what it documents
//! is what is defined here.

/// Request metadata of `StreamTelemetry`, by which a worker names itself.
pub mod headers {
    pub const WORKER_ID: &str = "x-worker-id";
    pub const WORKER_POOL: &str = "x-worker-pool";
    pub const WORKER_PID: &str = "x-worker-pid";
    /// Followed by the label's key, in lower case: `x-worker-label-zone`.
    pub const WORKER_LABEL_PREFIX: &str = "x-worker-label-";
    /// Set to [`CONTROL_ACK_YES`] by clients that apply and acknowledge control states.
    pub const CONTROL_ACK: &str = "x-bridge-control-ack";
    pub const CONTROL_ACK_YES: &str = "1";
    pub const WORKER_INSTANCE: &str = "x-worker-instance";
    pub const WORKER_GPU: &str = "x-worker-gpu";
    pub const WORKER_HOST: &str = "x-worker-host";

    /// Every header above, for checks that cover them all.
    pub const ALL: [&str; 8] = [
        WORKER_ID,
        WORKER_POOL,
        WORKER_PID,
        WORKER_LABEL_PREFIX,
        CONTROL_ACK,
        WORKER_INSTANCE,
        WORKER_GPU,
        WORKER_HOST,
    ];
}

/// Event names that belong to the protocol, as name tokens (the wire form).
pub mod events {
    /// The first token of every reserved name: workers may send only the two names below that
    /// start with it, and the hub refuses the others.
    pub const RESERVED_PREFIX: &str = "bridge";

    /// Sent by a worker after applying a control state, with [`CONTROL_APPLIED_VERSION`].
    pub const CONTROL_APPLIED: [&str; 3] = [RESERVED_PREFIX, "control", "applied"];
    /// The int measurement of [`CONTROL_APPLIED`]: the version applied.
    pub const CONTROL_APPLIED_VERSION: &str = "version";
    /// Sent by a worker with its cumulative counters ([`super::counters`]) as int measurements.
    pub const WORKER_STATS: [&str; 3] = [RESERVED_PREFIX, "worker", "stats"];

    /// Published by the hub about a worker's stream.
    pub const WORKER_CONNECTED: [&str; 3] = [RESERVED_PREFIX, "worker", "connected"];
    pub const WORKER_DISCONNECTED: [&str; 3] = [RESERVED_PREFIX, "worker", "disconnected"];
    /// Published by a clustered hub about its NATS connection (the event's worker id is the
    /// hub's node name): while it is cut off, events from other hubs may be missing.
    pub const CLUSTER_CONNECTED: [&str; 3] = [RESERVED_PREFIX, "cluster", "connected"];
    pub const CLUSTER_DISCONNECTED: [&str; 3] = [RESERVED_PREFIX, "cluster", "disconnected"];

    /// Every reserved name above.
    pub const ALL: [[&str; 3]; 6] = [
        CONTROL_APPLIED,
        WORKER_STATS,
        WORKER_CONNECTED,
        WORKER_DISCONNECTED,
        CLUSTER_CONNECTED,
        CLUSTER_DISCONNECTED,
    ];

    /// Whether a dotted event name is in the reserved namespace.
    pub fn is_reserved(name: &str) -> bool {
        name.split('.').next() == Some(RESERVED_PREFIX)
    }
}

/// The keys of a worker's `bridge.worker.stats` measurements: cumulative counts since the
/// worker started of what became of its events.
pub mod counters {
    /// Every event emitted, whatever became of it.
    pub const PRODUCED: &str = "produced";
    /// Numbered and buffered for the hub.
    pub const ACCEPTED: &str = "accepted";
    /// Handed to a stream, replays included.
    pub const SENT: &str = "sent";
    /// Sent again after a reconnect because the hub had not confirmed them.
    pub const REPLAYED: &str = "replayed";
    /// Confirmed received by the hub.
    pub const CONFIRMED: &str = "confirmed";
    /// Accepted and neither confirmed nor dropped yet.
    pub const BUFFERED: &str = "buffered";
    pub const SAMPLED_OUT: &str = "sampled_out";
    pub const FILTERED: &str = "filtered";
    pub const DISABLED: &str = "disabled";
    /// The start of every drop counter's key; the rest is the reason.
    pub const DROPPED_PREFIX: &str = "dropped.";
    /// The outage buffer was full; the oldest event made room.
    pub const DROPPED_BUFFER_FULL: &str = "dropped.buffer_full";
    /// A malformed event name.
    pub const DROPPED_INVALID_NAME: &str = "dropped.invalid_name";
    /// A sidecar's `TELEMETRY:` line that is not valid JSON of the expected shape, or a message
    /// from one of its local clients that does not decode.
    pub const DROPPED_PARSE_ERROR: &str = "dropped.parse_error";
    /// A sidecar's `TELEMETRY:` line longer than it holds (`worker.max_line_bytes`).
    pub const DROPPED_LINE_TOO_LONG: &str = "dropped.line_too_long";
    /// A relayed event whose trace or span id is not of its length or is all zero.
    pub const DROPPED_INVALID_TRACE_CONTEXT: &str = "dropped.invalid_trace_context";
    /// Over the hub's limits (`HubLimits`): never buffered, or dropped from the buffer instead
    /// of being sent.
    pub const DROPPED_OVER_LIMIT: &str = "dropped.over_limit";

    /// Every key a worker reports, in the order it reports them.
    pub const ALL: [&str; 15] = [
        PRODUCED,
        ACCEPTED,
        SENT,
        REPLAYED,
        CONFIRMED,
        BUFFERED,
        SAMPLED_OUT,
        FILTERED,
        DISABLED,
        DROPPED_BUFFER_FULL,
        DROPPED_INVALID_NAME,
        DROPPED_PARSE_ERROR,
        DROPPED_LINE_TOO_LONG,
        DROPPED_INVALID_TRACE_CONTEXT,
        DROPPED_OVER_LIMIT,
    ];
}

/// The keys of `WorkerInfo.hub_drops`: why the hub did not deliver a worker's events.
pub mod hub_drops {
    /// Control the worker had not applied yet said so.
    pub const DISABLED: &str = "disabled";
    pub const FILTERED: &str = "filtered";
    pub const SAMPLED_OUT: &str = "sampled_out";
    /// A malformed event, a reserved name the worker may not send, or a sequence number
    /// beyond [`super::MAX_SEQUENCE_JUMP`].
    pub const INVALID: &str = "invalid";
    /// A replay of an event already received.
    pub const DUPLICATE: &str = "duplicate";
    /// Over one of the hub's size limits.
    pub const OVER_LIMIT: &str = "over_limit";
    /// Over the worker's event rate quota.
    pub const RATE_LIMITED: &str = "rate_limited";

    pub const ALL: [&str; 7] = [
        DISABLED,
        FILTERED,
        SAMPLED_OUT,
        INVALID,
        DUPLICATE,
        OVER_LIMIT,
        RATE_LIMITED,
    ];
}

/// GPU metrics as the sidecar emits them (from NVML, or simulated) and as `bridge top` and
/// dashboards read them; the README's GPU metrics table documents them.
pub mod gpu {
    /// One device's sample.
    pub const METRICS_EVENT: &str = "gpu.metrics";
    /// One compute process on a device.
    pub const PROCESS_EVENT: &str = "gpu.process";

    /// Metadata of both events.
    pub const DEVICE: &str = "device";
    pub const UUID: &str = "uuid";
    pub const NAME: &str = "name";

    /// Measurements of [`METRICS_EVENT`]; `bridge top` shows the first, an int percent.
    pub const UTILIZATION_GPU_PERCENT: &str = "utilization_gpu_percent";
    pub const UTILIZATION_MEMORY_PERCENT: &str = "utilization_memory_percent";
    pub const MEMORY_USED_BYTES: &str = "memory_used_bytes";
    pub const MEMORY_TOTAL_BYTES: &str = "memory_total_bytes";
    pub const TEMPERATURE_CELSIUS: &str = "temperature_celsius";
    pub const POWER_WATTS: &str = "power_watts";
    pub const SM_CLOCK_MHZ: &str = "sm_clock_mhz";
    pub const COMPUTE_PROCESSES: &str = "compute_processes";

    /// Measurements of [`PROCESS_EVENT`].
    pub const PID: &str = "pid";
    pub const USED_MEMORY_BYTES: &str = "used_memory_bytes";
}

/// What every span's events carry (`{operation}.start`, `.stop`, `.exception`), whatever the
/// operation; `docs/conventions.md` is the catalogue.
pub mod span {
    /// The suffixes of a span's three event names.
    pub const START: &str = "start";
    pub const STOP: &str = "stop";
    pub const EXCEPTION: &str = "exception";

    /// Int measurement of all three: wall-clock nanoseconds since the Unix epoch, where the
    /// event's `timestamp_ns` may be the hub's or a relay's clock.
    pub const SYSTEM_TIME_NS: &str = "system_time_ns";
    /// Int measurement of `.stop` and `.exception`: nanoseconds since `.start`, monotonic.
    pub const DURATION_NS: &str = "duration_ns";

    /// Metadata of `.stop` ([`RESULT_SUCCESS`]) and `.exception` ([`RESULT_ERROR`]).
    pub const RESULT: &str = "result";
    pub const RESULT_SUCCESS: &str = "success";
    pub const RESULT_ERROR: &str = "error";
    /// Metadata of `.exception`: a short, low-cardinality class (`CudaOutOfMemory`, `Timeout`),
    /// and a human-readable message.
    pub const ERROR_TYPE: &str = "error_type";
    pub const ERROR_MESSAGE: &str = "error_message";
    /// The `error_type` of a span that ended by a panic, or was dropped without being ended.
    pub const ERROR_TYPE_PANIC: &str = "panic";
    pub const ERROR_TYPE_DROPPED: &str = "dropped";

    /// The keys a span sets itself, which a caller's values do not replace.
    pub const OWN_MEASUREMENTS: [&str; 2] = [SYSTEM_TIME_NS, DURATION_NS];
    pub const OWN_METADATA: [&str; 3] = [RESULT, ERROR_TYPE, ERROR_MESSAGE];
}

/// Inference calls, as a span of operation [`OPERATION`] (see [`span`]): the event names and the
/// fields every emitter (worker library, sidecar lines, `worker --simulate`, the demo) writes and
/// every reader (metrics, exporters, `bridge top`) expects. Units are in the names.
///
/// `docs/conventions.md` catalogues them with types, the event that carries each, and the
/// OpenTelemetry GenAI semantic convention each maps to, where there is one.
pub mod inference {
    /// The span's operation: its events are the three below.
    pub const OPERATION: &str = "inference";
    pub const START: &str = "inference.start";
    pub const STOP: &str = "inference.stop";
    pub const EXCEPTION: &str = "inference.exception";

    // Metadata, on all three events.
    /// The model served (`gen_ai.request.model`).
    pub const MODEL: &str = "model";
    /// The model's version or revision, when the deployment has one.
    pub const MODEL_VERSION: &str = "model_version";
    /// `pytorch`, `tensorflow`, `onnx`, `vllm`...
    pub const FRAMEWORK: &str = "framework";
    /// `preprocessing`, `inference` or `postprocessing`, for a call that is one stage of a
    /// pipeline.
    pub const PIPELINE_STAGE: &str = "pipeline_stage";
    pub use super::span::{ERROR_MESSAGE, ERROR_TYPE, RESULT, RESULT_ERROR, RESULT_SUCCESS};

    // Measurements on `.stop` (and on `.exception`, those known when it failed).
    pub use super::span::{DURATION_NS, SYSTEM_TIME_NS};
    /// Int: prompt tokens, cached ones included (`gen_ai.usage.input_tokens`).
    pub const INPUT_TOKENS: &str = "input_tokens";
    /// Int: generated tokens (`gen_ai.usage.output_tokens`).
    pub const OUTPUT_TOKENS: &str = "output_tokens";
    /// Int: prompt tokens served from a cache; over [`INPUT_TOKENS`], the cache hit rate
    /// (`gen_ai.usage.cache_read.input_tokens`).
    pub const CACHED_INPUT_TOKENS: &str = "cached_input_tokens";
    /// Int: the length of the sequence the model ran, in tokens (padded, for a batch).
    pub const SEQUENCE_LENGTH_TOKENS: &str = "sequence_length_tokens";
    /// Int: from the request's start to its first generated token
    /// (the `gen_ai.server.time_to_first_token` metric, in seconds there).
    pub const TIME_TO_FIRST_TOKEN_NS: &str = "time_to_first_token_ns";
    /// Int: time the request waited in the server's queue before it ran.
    pub const QUEUE_WAIT_NS: &str = "queue_wait_ns";
    /// Int: requests waiting in the queue when this one was taken.
    pub const QUEUE_DEPTH: &str = "queue_depth";
    /// Int: requests in the batch this one ran in.
    pub const BATCH_SIZE: &str = "batch_size";
    /// Float in `[0, 1]`: the batch's size over the most it could hold.
    pub const BATCH_FILL_RATIO: &str = "batch_fill_ratio";

    /// Every metadata key above.
    pub const METADATA: [&str; 7] = [
        MODEL,
        MODEL_VERSION,
        FRAMEWORK,
        PIPELINE_STAGE,
        RESULT,
        ERROR_TYPE,
        ERROR_MESSAGE,
    ];
    /// Every measurement key above.
    pub const MEASUREMENTS: [&str; 11] = [
        SYSTEM_TIME_NS,
        DURATION_NS,
        INPUT_TOKENS,
        OUTPUT_TOKENS,
        CACHED_INPUT_TOKENS,
        SEQUENCE_LENGTH_TOKENS,
        TIME_TO_FIRST_TOKEN_NS,
        QUEUE_WAIT_NS,
        QUEUE_DEPTH,
        BATCH_SIZE,
        BATCH_FILL_RATIO,
    ];
}

/// The furthest a worker's sequence number may jump past the last one the hub received from
/// its process (or past 0, for the first): 2^48, which a worker emitting a million events a
/// second reaches in about nine years. A numbered event beyond it is refused and counted as
/// `invalid`, and the hub keeps following the sequence from where it was.
pub const MAX_SEQUENCE_JUMP: u64 = 1 << 48;

/// Events a worker holds until the hub confirms them, unless configured otherwise
/// (`worker.buffer_events`, `--buffer-events`, `LinkOptions::buffer_events`).
pub const DEFAULT_BUFFER_EVENTS: usize = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    const PROTO: &str = include_str!("../telemetry/bridge/v1/bridge.proto");
    const CONVENTIONS: &str = include_str!("../../docs/conventions.md");

    /// The comment block just above `message NAME` (or `rpc NAME`), without the `//`s.
    fn comment_before(declaration: &str) -> String {
        let at = PROTO.find(declaration).expect(declaration);
        let line_start = PROTO[..at].rfind('\n').unwrap_or(0);
        let mut lines: Vec<&str> = PROTO[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .take_while(|line| line.starts_with("//"))
            .map(|line| line.trim_start_matches('/').trim())
            .collect();
        lines.reverse();
        lines.join(" ")
    }

    /// Every `"dropped.…"` quoted in `text`.
    fn quoted_drop_keys(text: &str) -> Vec<&str> {
        text.split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with(counters::DROPPED_PREFIX) && !s.contains('<'))
            .collect()
    }

    #[test]
    fn the_proto_documents_every_header_and_reserved_name() {
        let stream = comment_before("rpc StreamTelemetry");
        for header in headers::ALL {
            assert!(stream.contains(header), "{header} is not documented");
        }
        for name in events::ALL {
            let dotted = name.join(".");
            assert!(PROTO.contains(&format!("\"{dotted}\"")), "{dotted}");
            assert!(events::is_reserved(&dotted));
        }
        assert!(!events::is_reserved("bridges.x") && !events::is_reserved("gpu.bridge"));
    }

    /// The counter keys `ControlState` documents are exactly the ones workers send: no reason
    /// that is never sent (as `dropped.queue_full` once was), none sent but undocumented.
    #[test]
    fn the_documented_worker_counters_are_the_ones_sent() {
        let documented = comment_before("message ControlState");
        for key in counters::ALL {
            assert!(
                documented.contains(&format!("\"{key}\"")),
                "{key} is not documented"
            );
        }
        for key in quoted_drop_keys(PROTO) {
            assert!(
                counters::ALL.contains(&key),
                "{key} is documented, never sent"
            );
        }
    }

    #[test]
    fn the_documented_hub_drop_reasons_are_the_ones_counted() {
        let documented = comment_before("map<string, uint64> hub_drops");
        let quoted: Vec<&str> = documented.split('"').skip(1).step_by(2).collect();
        let mut expected = hub_drops::ALL.to_vec();
        let mut found = quoted.clone();
        expected.sort_unstable();
        found.sort_unstable();
        assert_eq!(found, expected, "{documented}");
    }

    /// `docs/conventions.md` catalogues every inference field as a backquoted name, and the
    /// span's event names are the operation's with the span's suffixes.
    #[test]
    fn the_conventions_document_every_inference_name() {
        for name in [inference::START, inference::STOP, inference::EXCEPTION]
            .into_iter()
            .chain(inference::METADATA)
            .chain(inference::MEASUREMENTS)
        {
            assert!(
                CONVENTIONS.contains(&format!("`{name}`")),
                "{name} is not in docs/conventions.md"
            );
        }
        for (event, suffix) in [
            (inference::START, span::START),
            (inference::STOP, span::STOP),
            (inference::EXCEPTION, span::EXCEPTION),
        ] {
            assert_eq!(event, format!("{}.{suffix}", inference::OPERATION));
        }
    }
}
