//! `bridge-bench --quick` runs end to end against the `bridge` binary next to it and reports
//! every figure the performance targets name. Only the shape is checked: figures measured in a
//! debug build on a shared CI machine say nothing about speed (BENCHMARKS.md records real runs).

use std::process::Command;

use bridge_tests::bin;

#[test]
fn without_a_bridge_binary_next_to_it_the_benchmark_says_so_in_one_line() {
    // In the target directory, so that a link is enough: the binary is large in a debug build.
    let target_dir = bin("bridge-bench").parent().expect("bin dir").to_owned();
    let dir = tempfile::tempdir_in(target_dir).expect("temp dir");
    let alone = dir.path().join("bridge-bench");
    if std::fs::hard_link(bin("bridge-bench"), &alone).is_err() {
        std::fs::copy(bin("bridge-bench"), &alone).expect("copy bridge-bench");
    }
    // Outside cargo: under it, the benchmark would build the hub instead.
    let output = Command::new(&alone)
        .args(["--quick", "--json"])
        .env_remove("CARGO")
        .output()
        .expect("run bridge-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: no `bridge` binary next to ") && stderr.contains("cargo run"),
        "{stderr}"
    );
}

#[test]
fn the_quick_benchmark_reports_every_figure_next_to_its_baseline() {
    let output = Command::new(bin("bridge-bench"))
        .args(["--quick", "--json"])
        .output()
        .expect("run bridge-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // The hub measured is the product's own binary, not a copy inside the benchmark.
    let hub = bin("bridge");
    assert!(
        stderr.contains(&format!("measuring the hub {}\n", hub.display())),
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert!(report["machine"]["cores"].as_u64().is_some_and(|c| c > 0));
    assert!(report["commit"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(
        report["event_bytes"]
            .as_u64()
            .is_some_and(|b| (120..=160).contains(&b))
    );

    let figures = report["figures"].as_array().expect("figures");
    let find = |prefix: &str| {
        figures
            .iter()
            .find(|f| f["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no figure `{prefix}` in {figures:#?}"))
    };
    let with_target = [
        "ingest, 8 workers",
        "1000 workers x 50 events/s, hub CPU",
        "fan-out, 10 subscribers matching all",
        "fan-out, 100 subscribers matching all",
        "emit -> subscriber p99, 50000 deliveries/s",
        "emit -> subscriber p99, 400000 deliveries/s",
        "sample one worker -> acknowledged p99",
        "sample --all -> acknowledged by all",
        "hub memory per idle worker",
        "emit, telemetry disabled",
        "emit, sampled out",
        "emit, queued",
        "4 workers at 60000 events/s, delivered under pressure",
        "  log records per core the export costs",
    ];
    for name in with_target {
        let figure = find(name);
        assert!(
            figure["value"].as_f64().is_some_and(|v| v >= 0.0),
            "{figure}"
        );
        assert!(
            figure["target"].is_string() && figure["met"].is_boolean(),
            "{figure}"
        );
    }
    let with_baseline = [
        "ingest, 1 workers",
        "ingest, 64 workers",
        "  hub CPU per million events",
        "fan-out, 1 subscribers matching all",
        "fan-out, 100 subscribers matching 1 % each",
        "fan-out cost, 1 subscribers at",
        "fan-out cost, 100 subscribers at",
        "  with hub.connection_threads = 1",
        "  with subscriptions lingering 1 ms",
        "emit -> subscriber p50, 25 % of max ingest",
        "emit -> subscriber p99.9, 75 % of max ingest",
        "sample one worker -> acknowledged p50",
        "hub memory per idle worker",
        "emit, queued",
        "4 workers at 60000 events/s, delivered under pressure",
        "  ingest with export",
    ];
    for name in with_baseline {
        let figure = find(name);
        assert!(figure["value"].as_f64().is_some(), "{figure}");
        assert!(figure["baseline"].as_f64().is_some(), "{figure}");
        assert!(figure["ratio"].as_f64().is_some(), "{figure}");
    }
    // Two hubs on a nats-server, when there is one (./test.sh installs it and requires it).
    if std::env::var_os("BRIDGE_REQUIRE_NATS").is_some() {
        for name in [
            "fan-out across hubs, 1 subscriber matching all",
            "CPU-s per million events delivered at",
            "event -> subscriber latency at 10000 events/s, p99",
            "through the other hub: sample one worker -> acknowledged p99",
            "through the other hub: sample --all -> acknowledged by all",
        ] {
            let figure = find(name);
            assert!(
                figure["value"].as_f64().is_some_and(|v| v > 0.0),
                "{figure}"
            );
            assert!(
                figure["baseline"].as_f64().is_some_and(|v| v > 0.0),
                "{figure}"
            );
        }
    }
    // A leak check: may be negative when the allocator returned pages between waves.
    let growth = find("hub RSS growth under pressure");
    assert!(
        growth["value"].as_f64().is_some_and(f64::is_finite),
        "{growth}"
    );
    assert!(growth["met"].is_boolean(), "{growth}");
    assert!(
        find("flooding worker at 5 x its quota")["value"]
            .as_f64()
            .is_some()
    );
}
