//! The names and defaults every participant must agree on besides the message types: request
//! metadata, reserved event names, the counters workers report and the hub's drop reasons, the
//! GPU events the sidecar emits and `bridge top` reads, and the default outage buffer.
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

    /// Every header above, for checks that cover them all.
    pub const ALL: [&str; 7] = [
        WORKER_ID,
        WORKER_POOL,
        WORKER_PID,
        WORKER_LABEL_PREFIX,
        CONTROL_ACK,
        WORKER_INSTANCE,
        WORKER_GPU,
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
    /// A sidecar's `TELEMETRY:` line that is not valid JSON of the expected shape.
    pub const DROPPED_PARSE_ERROR: &str = "dropped.parse_error";
    /// A sidecar's `TELEMETRY:` line longer than it holds (`worker.max_line_bytes`).
    pub const DROPPED_LINE_TOO_LONG: &str = "dropped.line_too_long";

    /// Every key a worker reports, in the order it reports them.
    pub const ALL: [&str; 13] = [
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
    ];
}

/// The keys of `WorkerInfo.hub_drops`: why the hub did not deliver a worker's events.
pub mod hub_drops {
    /// Control the worker had not applied yet said so.
    pub const DISABLED: &str = "disabled";
    pub const FILTERED: &str = "filtered";
    pub const SAMPLED_OUT: &str = "sampled_out";
    /// A malformed event, or a reserved name the worker may not send.
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

/// Events a worker holds until the hub confirms them, unless configured otherwise
/// (`worker.buffer_events`, `--buffer-events`, `LinkOptions::buffer_events`).
pub const DEFAULT_BUFFER_EVENTS: usize = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    const PROTO: &str = include_str!("../telemetry/bridge/v1/bridge.proto");

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
}
