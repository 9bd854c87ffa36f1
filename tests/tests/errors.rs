//! Bad input gets a clear error with the right status or exit code, and loses nothing else.

use std::time::Duration;

use bridge_proto::protocol::{events, headers, hub_drops};
use bridge_proto::v1::{self, selector::Target, update_control_request::Change};
use bridge_tests::{
    HubOptions, HubProcess, Recorder, WorkerProcess, cli, eventually, name, open_stream,
    worker_info,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

fn sampling(target: Target, rate: f64, patterns: &[&str]) -> v1::UpdateControlRequest {
    v1::UpdateControlRequest {
        selector: Some(v1::Selector {
            target: Some(target),
        }),
        change: Some(Change::Sampling(v1::TelemetrySamplingUpdate {
            sampling_rate: rate,
            event_patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
        })),
        wait_ms: 0,
        for_ms: 0,
    }
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, text: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(text),
        "{:?} should mention {text:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_subscribe_calls_reject_bad_input_with_the_right_status() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let raw = client.raw();
    let all = || Target::All(true);

    for (rate, shown) in [
        (1.5, "1.5"),
        (-0.1, "-0.1"),
        (f64::NAN, "NaN"),
        (f64::INFINITY, "inf"),
    ] {
        let result = raw.update_control(sampling(all(), rate, &[])).await;
        assert_status(
            result,
            Code::InvalidArgument,
            &format!("sampling rate {shown} is invalid"),
        );
    }
    let result = raw
        .update_control(sampling(all(), 0.5, &["inference.>", "a..b"]))
        .await;
    assert_status(
        result,
        Code::InvalidArgument,
        "event_patterns[1]: `a..b` has an empty token",
    );
    let result = raw.update_control(sampling(all(), 0.5, &["a.>.b"])).await;
    assert_status(
        result,
        Code::InvalidArgument,
        "`>` may only be the last token",
    );

    let result = raw
        .update_control(sampling(Target::WorkerId("ghost".into()), 0.5, &[]))
        .await;
    assert_status(
        result,
        Code::NotFound,
        "no worker `ghost` is known to the hub",
    );
    let result = raw
        .get_control(v1::GetControlRequest {
            selector: Some(v1::Selector {
                target: Some(Target::WorkerId("ghost".into())),
            }),
        })
        .await;
    assert_status(result, Code::NotFound, "ghost");

    let mut no_selector = sampling(all(), 0.5, &[]);
    no_selector.selector = None;
    assert_status(
        raw.update_control(no_selector).await,
        Code::InvalidArgument,
        "selector",
    );
    let mut no_change = sampling(all(), 0.5, &[]);
    no_change.change = None;
    assert_status(
        raw.update_control(no_change).await,
        Code::InvalidArgument,
        "change",
    );

    let result = raw
        .subscribe(v1::SubscribeRequest {
            patterns: vec!["ok.*".into(), "bad*".into()],
            ..Default::default()
        })
        .await;
    assert_status(result, Code::InvalidArgument, "patterns[1]: `bad*`");

    // None of that changed anything.
    let state = raw
        .get_control(v1::GetControlRequest {
            selector: Some(v1::Selector {
                target: Some(all()),
            }),
        })
        .await
        .expect("get control")
        .into_inner();
    let effective = state.effective.expect("effective");
    assert_eq!((effective.sampling_rate, effective.rules.len()), (1.0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_worker_streams_are_refused_or_cut_with_a_clear_status() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[hub]\nmax_message_bytes = 4096\n".into()),
        ..Default::default()
    });
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;

    // Identity that cannot be parsed.
    let result = open_stream(&mut client, &[(headers::WORKER_PID, "not-a-pid")])
        .await
        .map(drop);
    assert_status(
        result,
        Code::InvalidArgument,
        "x-worker-pid: `not-a-pid` is not a process id",
    );

    // Invalid events are dropped and counted; the stream and the valid events go on.
    let (tx, mut controls) = open_stream(&mut client, &[(headers::WORKER_ID, "sloppy")])
        .await
        .expect("opens");
    let event = |parts: &[&str]| v1::TelemetryEvent {
        event_parts: parts.iter().map(|p| (*p).to_owned()).collect(),
        ..Default::default()
    };
    for bad in [
        &[][..],
        &["a", ""],
        &["a.b"],
        &["gpu", "*"],
        &events::WORKER_CONNECTED,
    ] {
        tx.send(event(bad)).await.expect("send");
    }
    tx.send(event(&["fine", "event"])).await.expect("send");
    eventually("the valid event to be delivered", WAIT, || async {
        tail.deliveries()
            .iter()
            .any(|d| name(d) == "fine.event")
            .then_some(())
    })
    .await;
    let sloppy = worker_info(&mut client, "sloppy").await.expect("listed");
    assert_eq!(
        sloppy.hub_drops.get(hub_drops::INVALID),
        Some(&5),
        "{:?}",
        sloppy.hub_drops
    );
    let from_sloppy: Vec<String> = tail
        .deliveries()
        .iter()
        .filter(|d| d.worker_id == "sloppy")
        .map(name)
        .collect();
    // The hub's own announcement, then the valid event; the forged announcement was dropped.
    assert_eq!(
        from_sloppy,
        [events::WORKER_CONNECTED.join("."), "fine.event".to_owned()]
    );

    // A message over the limit ends that stream with RESOURCE_EXHAUSTED, and only that one.
    let mut huge = event(&["huge"]);
    huge.metadata.insert("blob".into(), "x".repeat(10_000));
    tx.send(huge).await.expect("send");
    let status = loop {
        match tokio::time::timeout(WAIT, controls.message())
            .await
            .expect("stream ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream must end with a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_message_bytes"),
        "{}",
        status.message()
    );

    let _healthy = WorkerProcess::start(&hub.url, "healthy", "", &["--simulate", "50"]);
    eventually("other workers to be unaffected", WAIT, || async {
        tail.deliveries()
            .iter()
            .any(|d| d.worker_id == "healthy" && name(d).starts_with("inference."))
            .then_some(())
    })
    .await;
}

/// Worker ids, pools and label keys that break the documented rule (`bridge_proto::identity`)
/// are refused where they enter: by the hub with INVALID_ARGUMENT naming the header, and by the
/// sidecar at start-up with a usage error, before anything reaches a log, a metrics label or
/// a subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_names_outside_the_rule_are_refused_at_the_edge() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    for (key, value, problem) in [
        (headers::WORKER_ID, "../../etc/passwd", "'/' is not allowed"),
        (headers::WORKER_ID, " ", "' ' is not allowed"),
        (
            headers::WORKER_ID,
            "inj\",forged=\"yes",
            "'\"' is not allowed",
        ),
        (
            headers::WORKER_POOL,
            "..",
            "does not start with a letter or digit",
        ),
        ("x-worker-label-z.one", "b", "'.' is not allowed"),
    ] {
        let result = open_stream(&mut client, &[(key, value)]).await.map(drop);
        assert_status(result, Code::InvalidArgument, problem);
    }
    let listed = client
        .raw()
        .list_workers(v1::ListWorkersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.workers.is_empty(), "{:?}", listed.workers);

    for args in [
        &["--id", "../../etc/passwd"][..],
        &["--id", "ok", "--pool", " "],
        &["--id", "ok", "--label", "z/one=b"],
    ] {
        let out = std::process::Command::new(bridge_tests::bin("worker"))
            .args(["--hub", &hub.url, "--simulate", "1"])
            .args(args)
            .output()
            .expect("run worker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("is not allowed"), "{stderr}");
    }
}

/// A sequence number of 2^64-1 once made `missing_events` read 1.8e19 and every later event
/// of the worker process a "duplicate". Now it is refused (`invalid`), and the sequence goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_sequence_number_is_refused_and_the_sequence_goes_on() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, v1::SubscribeRequest::default()).await;
    let (tx, _controls) = open_stream(
        &mut client,
        &[
            (headers::WORKER_ID, "jumpy"),
            (headers::WORKER_INSTANCE, "1"),
        ],
    )
    .await
    .expect("opens");
    for (sequence, tag) in [(1, "one"), (u64::MAX, "absurd"), (2, "two"), (3, "three")] {
        let event = v1::TelemetryEvent {
            event_parts: vec!["step".into(), tag.into()],
            sequence,
            ..Default::default()
        };
        tx.send(event).await.expect("send");
    }
    let delivered = || -> Vec<String> {
        tail.deliveries()
            .iter()
            .filter(|d| d.worker_id == "jumpy" && name(d).starts_with("step."))
            .map(name)
            .collect()
    };
    eventually("the events after it to be delivered", WAIT, || async {
        (delivered().len() == 3).then_some(())
    })
    .await;
    assert_eq!(delivered(), ["step.one", "step.two", "step.three"]);
    let info = worker_info(&mut client, "jumpy").await.expect("listed");
    assert_eq!(
        (info.missing_events, info.last_sequence),
        (0, 3),
        "{info:?}"
    );
    assert_eq!(info.hub_drops.get(hub_drops::INVALID), Some(&1));
    assert_eq!(
        info.hub_drops
            .get(hub_drops::DUPLICATE)
            .copied()
            .unwrap_or(0),
        0
    );
}

/// A message that does not decode is the client's fault: INVALID_ARGUMENT (not INTERNAL), on a
/// unary call and on a worker's stream alike, counted in `/metrics`, and on a stream counted as
/// the worker's `invalid` drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_invalid_arguments_and_counted() {
    use bridge_tests::{http_get, metric_sample, raw};
    let hub = HubProcess::start();
    // Field 1, length 5, and no bytes after it.
    let truncated = bytes::Bytes::from_static(&[0x0a, 0x05]);
    let result = raw::unary(
        &hub.url,
        "/telemetry.bridge.v1.TelemetryBridge/ListWorkers",
        truncated.clone(),
    )
    .await;
    assert_status(result, Code::InvalidArgument, "malformed message");

    let valid = {
        use prost::Message;
        v1::TelemetryEvent {
            event_parts: vec!["fine".into()],
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    };
    let mut controls = raw::stream(
        &hub.url,
        "/telemetry.bridge.v1.TelemetryBridge/StreamTelemetry",
        &[(headers::WORKER_ID, "garbled")],
        vec![valid, truncated],
    )
    .await
    .expect("opens");
    let status = loop {
        match tokio::time::timeout(WAIT, controls.message())
            .await
            .expect("the stream ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream must end with a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("malformed message"), "{status:?}");

    let mut client = hub.client().await;
    let info = worker_info(&mut client, "garbled").await.expect("listed");
    assert_eq!(info.events_received, 2, "{info:?}");
    assert_eq!(info.hub_drops.get(hub_drops::INVALID), Some(&1), "{info:?}");
    let metrics = tokio::task::block_in_place(|| http_get(hub.http, "/metrics", &[])).body;
    assert_eq!(
        metric_sample(&metrics, "bridge_malformed_messages_total"),
        Some(2.0),
        "{metrics}"
    );
}

#[test]
fn cli_errors_are_one_line_with_a_meaningful_exit_code() {
    let hub = HubProcess::start();
    let line = |out: &bridge_tests::CliOutput| {
        assert_eq!(out.stderr.lines().count(), 1, "one line: {:?}", out.stderr);
        out.stderr.trim_end().to_owned()
    };

    for rate in ["1.5", "nan", "-1", "lots"] {
        let out = cli(&hub.url, &["sample", "--all", rate]);
        assert_eq!(out.code, Some(2), "{out:?}");
        assert_eq!(
            line(&out),
            format!(
                "error: sampling rate `{rate}` is invalid: it must be a number from 0 to 1 (0.05 keeps 5 % of events)"
            )
        );
    }
    let out = cli(
        &hub.url,
        &["sample", "--all", "0.5", "--pattern", "inference..x"],
    );
    assert_eq!(out.code, Some(2));
    assert!(line(&out).contains("`inference..x` has an empty token at position 2"));
    let out = cli(&hub.url, &["subscribe", "infer*"]);
    assert_eq!(out.code, Some(2));
    assert!(line(&out).contains("mixes a wildcard with text"));

    let out = cli(&hub.url, &["sample", "ghost", "0.5"]);
    assert_eq!(out.code, Some(4), "{out:?}");
    assert_eq!(
        line(&out),
        "error: no worker `ghost` is known to the hub (`bridge workers` lists them)"
    );
    let out = cli(&hub.url, &["toggle", "ghost", "maybe"]);
    assert_eq!(out.code, Some(2));
    assert!(line(&out).contains("`maybe`: say on or off"));
    let out = cli(&hub.url, &["sample", "0.5"]);
    assert_eq!(out.code, Some(2));
    assert!(line(&out).contains("name a WORKER"));
    // A worker without its value is a missing value, not a missing worker.
    let out = cli(&hub.url, &["sample", "gpu-3"]);
    assert_eq!(out.code, Some(2));
    assert_eq!(
        line(&out),
        "error: RATE is missing: give it after the worker (gpu-3 RATE)"
    );
    let out = cli(&hub.url, &["toggle", "gpu-3"]);
    assert_eq!(out.code, Some(2));
    assert!(line(&out).contains("on|off is missing"), "{}", out.stderr);
    // Clearing filters reads as what it did, not as "no filter applied".
    let out = cli(&hub.url, &["filter", "--all", "--clear"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("filters cleared: stored as version"),
        "{}",
        out.stdout
    );

    let out = cli("http://127.0.0.1:1", &["workers"]);
    assert_eq!(out.code, Some(3));
    assert!(
        line(&out).starts_with("error: hub unreachable at http://127.0.0.1:1: "),
        "{}",
        out.stderr
    );
    let out = cli("127.0.0.1:50051", &["workers"]);
    assert_eq!(out.code, Some(2));
    assert!(line(&out).contains("must start with http://"));
}

#[test]
fn serve_refuses_bad_configuration_and_a_corrupt_state_file() {
    let dir = tempfile::tempdir().expect("temp");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[control.pools.llama]\nsampling_rate = 2\n").expect("write");
    let out = cli(
        "http://unused",
        &[
            "serve",
            "--config",
            config.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("`control.pools.llama.sampling_rate`"),
        "{}",
        out.stderr
    );

    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    std::fs::write(state.join("control.json"), "{ truncated").expect("write");
    let out = cli(
        "http://unused",
        &[
            "serve",
            "--state-dir",
            state.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("control.json") && out.stderr.contains("move the file away"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read_to_string(state.join("control.json")).expect("kept"),
        "{ truncated",
        "nothing lost"
    );
}

/// A hub that accepts connections and never answers (a stalled process, a black-holing proxy)
/// once held every command forever; now each gives up after its timeouts with exit 3.
#[test]
fn cli_commands_give_up_on_a_hub_that_accepts_and_never_answers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accepts, keeps each connection open, and never writes a byte.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let timeouts = ["--connect-timeout", "1s", "--request-timeout", "1s"];
    let plain = format!("http://{addr}");
    let tls = format!("https://{addr}");
    for (hub, command, said) in [
        (&plain, &["workers"][..], "no answer within 1s"),
        (&plain, &["subscribe"], "no answer within 1s"),
        (&plain, &["control", "--all"], "no answer within 1s"),
        // The request timeout plus the acknowledgement wait the change asks for.
        (
            &plain,
            &["sample", "--all", "0.5", "--timeout", "1s"],
            "no answer within 2s",
        ),
        // Over TLS the handshake itself never completes.
        (&tls, &["workers"], "no connection within 1s"),
    ] {
        let mut args = timeouts.to_vec();
        args.extend(command);
        let started = std::time::Instant::now();
        let out = cli(hub, &args);
        assert_eq!(out.code, Some(3), "{command:?}: {out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{command:?} took {:?}",
            started.elapsed()
        );
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr
                .starts_with(&format!("error: hub unreachable at {hub}: "))
                && out.stderr.contains(said),
            "{command:?}: {}",
            out.stderr
        );
    }
}

/// `--hub` pointed at the hub's HTTP port once failed with a cryptic `invalid compression flag`.
#[test]
fn the_cli_says_when_hub_points_at_the_http_port() {
    let hub = HubProcess::start();
    let http = format!("http://{}", hub.http);
    for command in [
        &["workers"][..],
        &["subscribe"],
        &["sample", "--all", "0.5"],
    ] {
        let out = cli(&http, command);
        assert_eq!(out.code, Some(3), "{command:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr.contains("does not answer gRPC")
                && out.stderr.contains("HTTP port")
                && out.stderr.contains("gRPC port (default 50051)"),
            "{command:?}: {}",
            out.stderr
        );
    }
}
