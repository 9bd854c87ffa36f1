//! Who may call what: tokens with roles on every RPC, TLS, and mutual TLS tying a worker's id
//! to its certificate.

use std::{
    io::Read,
    net::TcpStream,
    time::{Duration, Instant},
};

use bridge::client::{ClientError, HubClient};
use bridge_proto::connect::ClientSecurity;
use bridge_proto::protocol::headers;
use bridge_proto::v1::{self, selector::Target, update_control_request::Change};
use bridge_tests::{
    ADMIN_TOKEN, HubOptions, HubProcess, Pki, READER_TOKEN, WORKER_TOKEN, WorkerProcess,
    eventually, open_stream, run_cli, tokens_config, worker_info,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);
async fn client_with(url: &str, security: ClientSecurity) -> Result<HubClient, ClientError> {
    HubClient::connect_with(url, &security, Duration::from_secs(5)).await
}

fn token(token: &str) -> ClientSecurity {
    ClientSecurity {
        token: Some(token.into()),
        ..Default::default()
    }
}

/// The result code of each RPC for a client holding `credentials` (`Ok` is `Code::Ok`).
async fn codes(url: &str, credentials: ClientSecurity) -> [Code; 5] {
    let client = client_with(url, credentials).await.expect("connect");
    codes_of(client).await
}

/// [`codes`] for a connected client.
async fn codes_of(mut client: HubClient) -> [Code; 5] {
    let code = |result: Result<(), tonic::Status>| result.err().map_or(Code::Ok, |s| s.code());
    let raw = client.raw();
    let list = raw
        .list_workers(v1::ListWorkersRequest::default())
        .await
        .map(drop);
    let all = || {
        Some(v1::Selector {
            target: Some(Target::All(true)),
        })
    };
    let get = raw
        .get_control(v1::GetControlRequest { selector: all() })
        .await
        .map(drop);
    let update = raw
        .update_control(v1::UpdateControlRequest {
            selector: all(),
            change: Some(Change::Toggle(v1::TelemetryToggle { enabled: true })),
            wait_ms: 0,
            for_ms: 0,
        })
        .await
        .map(drop);
    let subscribe = raw
        .subscribe(v1::SubscribeRequest::default())
        .await
        .map(drop);
    let stream = open_stream(&mut client, &[(headers::WORKER_ID, "probe")])
        .await
        .map(drop);
    [
        code(stream),
        code(subscribe),
        code(list),
        code(get),
        code(update),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_needs_a_valid_token_whose_role_allows_it() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some(tokens_config()),
        ..Default::default()
    });
    use Code::{Ok as Allowed, PermissionDenied as Denied, Unauthenticated as NoToken};
    // Order: StreamTelemetry, Subscribe, ListWorkers, GetControl, UpdateControl.
    assert_eq!(
        codes(&hub.url, ClientSecurity::default()).await,
        [NoToken; 5],
        "no token"
    );
    assert_eq!(
        codes(&hub.url, token("not-a-token-of-this-hub")).await,
        [NoToken; 5],
        "wrong token"
    );
    assert_eq!(
        codes(&hub.url, token(WORKER_TOKEN)).await,
        [Allowed, Denied, Denied, Denied, Denied],
        "worker role"
    );
    assert_eq!(
        codes(&hub.url, token(READER_TOKEN)).await,
        [Denied, Allowed, Allowed, Allowed, Denied],
        "reader role"
    );
    assert_eq!(
        codes(&hub.url, token(ADMIN_TOKEN)).await,
        [Allowed; 5],
        "admin role"
    );

    // Health checks stay open, for load balancers and orchestrators.
    let channel = tonic::transport::Endpoint::from_shared(hub.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");
    assert_eq!(health.into_inner().status, 1, "SERVING");

    // The command line: one readable line, a distinct exit code, and never the token.
    let out = run_cli(&hub.url, &["workers"]).await;
    assert_eq!(out.code, Some(6), "{}", out.stderr);
    assert!(out.stderr.contains("requires a token"), "{}", out.stderr);
    let out = run_cli(
        &hub.url,
        &["--token", READER_TOKEN, "sample", "--all", "0.5"],
    )
    .await;
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim(),
        "error: token `dashboards` has role reader; this call needs role admin"
    );
    let out = run_cli(
        &hub.url,
        &["--token", ADMIN_TOKEN, "sample", "--all", "0.5"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // A sidecar with the worker token streams; one with a reader token is refused, says why,
    // and keeps its app running.
    let _fleet = WorkerProcess::start(
        &hub.url,
        "gpu-1",
        "",
        &["--token", WORKER_TOKEN, "--simulate", "20"],
    );
    let refused = WorkerProcess::start(
        &hub.url,
        "gpu-2",
        "",
        &["--token", READER_TOKEN, "--simulate", "20"],
    );
    let mut admin = client_with(&hub.url, token(ADMIN_TOKEN))
        .await
        .expect("connect");
    eventually("gpu-1 to stream", WAIT, || {
        let mut admin = admin.clone();
        async move {
            worker_info(&mut admin, "gpu-1")
                .await
                .filter(|w| w.events_received > 0)
        }
    })
    .await;
    eventually("gpu-2 to report the refusal", WAIT, || async {
        refused
            .log()
            .contains("token `dashboards` has role reader")
            .then_some(())
    })
    .await;
    assert!(worker_info(&mut admin, "gpu-2").await.is_none());
    let log = hub.log();
    for secret in [WORKER_TOKEN, READER_TOKEN, ADMIN_TOKEN] {
        assert!(!log.contains(secret), "the hub log shows a token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_admit_only_the_right_certificates() {
    let pki = Pki::new("bridge-test-ca");
    let other = Pki::new("some-other-ca");
    let server = pki.issue("hub", &["localhost", "127.0.0.1"]);
    let gpu_1 = pki.issue("gpu-1", &["gpu-1"]);
    let stranger = other.issue("gpu-1-forged", &["gpu-1"]);
    let hub = HubProcess::start_with(HubOptions {
        config: Some(format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            server.cert, server.key, pki.ca
        )),
        ..Default::default()
    });
    let https = format!("https://127.0.0.1:{}", hub.addr.port());
    let trusted = |cert: Option<&bridge_tests::Issued>| ClientSecurity {
        ca: Some(pki.ca.clone()),
        cert: cert.map(|c| c.cert.clone()),
        key: cert.map(|c| c.key.clone()),
        ..Default::default()
    };

    // Plaintext against TLS, a server certificate from an unknown CA, no client certificate,
    // and a client certificate from another CA: none get a single call through.
    let refusals = [
        ("plaintext", hub.url.clone(), ClientSecurity::default()),
        (
            "wrong CA",
            https.clone(),
            ClientSecurity {
                ca: Some(other.ca.clone()),
                ..trusted(Some(&gpu_1))
            },
        ),
        ("no client certificate", https.clone(), trusted(None)),
        (
            "client certificate from another CA",
            https.clone(),
            trusted(Some(&stranger)),
        ),
    ];
    for (case, url, security) in refusals {
        // Most fail to connect at all; where the TLS handshake lets the connection open (a
        // TLS 1.3 server checks the client's certificate after it), every RPC must fail.
        if let Ok(client) = client_with(&url, security).await {
            let codes = codes_of(client).await;
            assert!(
                codes.iter().all(|c| *c != Code::Ok),
                "{case}: some call went through: {codes:?}"
            );
        }
    }

    // The right certificate streams as its own name, and only as that.
    let mut client = client_with(&https, trusted(Some(&gpu_1)))
        .await
        .expect("mutual TLS");
    assert!(client.list_workers(None).await.is_ok());
    let status = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-2")])
        .await
        .map(drop)
        .expect_err("a name not in the certificate");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("`gpu-2` is not a name in the client certificate"),
        "{status:?}"
    );
    let status = open_stream(&mut client, &[])
        .await
        .map(drop)
        .expect_err("no name at all");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The sidecar and the CLI take the same options.
    let ca = pki.ca.to_string_lossy().into_owned();
    let (cert, key) = (
        gpu_1.cert.to_string_lossy().into_owned(),
        gpu_1.key.to_string_lossy().into_owned(),
    );
    let tls_args = ["--ca", &ca, "--cert", &cert, "--key", &key];
    let mut args = tls_args.to_vec();
    args.extend(["--simulate", "20"]);
    let _worker = WorkerProcess::start(&https, "gpu-1", "", &args);
    eventually("gpu-1 to stream over mutual TLS", WAIT, || {
        let mut client = client.clone();
        async move {
            worker_info(&mut client, "gpu-1")
                .await
                .filter(|w| w.events_received > 0)
        }
    })
    .await;
    let mut args = tls_args.to_vec();
    args.extend(["workers", "--format", "json"]);
    let out = run_cli(&https, &args).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("\"gpu-1\""), "{}", out.stdout);
    let out = run_cli(&https, &["workers"]).await;
    assert_eq!(
        out.code,
        Some(3),
        "no CA: the hub cannot be verified; {}",
        out.stderr
    );
    assert!(out.stderr.contains("--ca PEM"), "{}", out.stderr);

    // The hub's HTTP port, which serves TLS too, is named as such.
    let http_port = format!("https://127.0.0.1:{}", hub.http.port());
    let out = run_cli(&http_port, &["--ca", ca.as_str(), "workers"]).await;
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(
        out.stderr.contains("HTTP port") && out.stderr.contains("gRPC port (default 50051)"),
        "{}",
        out.stderr
    );

    // A failed connection says what is wrong and what to pass, in one line, rather than
    // `transport error` or `h2 protocol error` (exit 1).
    let no_cert = ["--ca", ca.as_str()];
    for (case, url, args, hint) in [
        (
            "no client certificate",
            &https,
            &no_cert[..],
            "--cert PEM and --key PEM",
        ),
        ("http:// against TLS", &hub.url, &[][..], "https://"),
    ] {
        for command in [
            &["workers"][..],
            &["sample", "--all", "0.5"],
            &["subscribe"],
        ] {
            let mut args = args.to_vec();
            args.extend(command);
            let out = run_cli(url, &args).await;
            assert_eq!(out.code, Some(3), "{case} {command:?}: {}", out.stderr);
            assert_eq!(out.stderr.lines().count(), 1, "{case}: {}", out.stderr);
            assert!(
                out.stderr
                    .starts_with(&format!("error: hub unreachable at {url}: "))
                    && out.stderr.contains(hint),
                "{case} {command:?}: {}",
                out.stderr
            );
        }
    }
}

#[test]
fn a_hub_without_tokens_serves_beyond_loopback_only_when_told_it_is_insecure() {
    let out = std::process::Command::new(bridge_tests::bin("bridge"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .expect("run bridge serve");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve 0.0.0.0:0 without tokens")
            && stderr.contains("--insecure"),
        "{stderr}"
    );

    let mut child = std::process::Command::new(bridge_tests::bin("bridge"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--insecure",
            "--http",
            "off",
            "--state-dir",
        ])
        .arg(tempfile::tempdir().expect("dir").path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let line = bridge_tests::read_line_within(child.stdout.take().expect("stdout"), WAIT);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.is_some_and(|l| l.starts_with("listening on 0.0.0.0:")),
        "--insecure serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_speaks_is_closed_after_the_handshake_timeout() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[limits]\nhandshake_timeout_ms = 300\n".into()),
        ..Default::default()
    });
    // On the gRPC port and on the HTTP port alike.
    for addr in [hub.addr, hub.http] {
        let (read, waited) = tokio::task::spawn_blocking(move || {
            let mut silent = TcpStream::connect(addr).expect("connect");
            silent
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let started = Instant::now();
            // The hub sends nothing before the client speaks; the read ends when it closes.
            let read = silent.read(&mut [0u8; 64]).map_err(|e| e.kind());
            (read, started.elapsed())
        })
        .await
        .expect("join");
        assert_eq!(
            read,
            Ok(0),
            "the hub closed the silent connection to {addr}"
        );
        assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    }
    // A client that talks is served as usual.
    let out = run_cli(&hub.url, &["workers"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}
