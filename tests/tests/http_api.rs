//! The HTTP JSON API against a real hub, with a real HTTP client: every route with good and bad
//! input and with every role, the same messages as the gRPC API, changes that reach the worker,
//! and every JSON body checked against the hub's own OpenAPI document.

use std::time::Duration;

use bridge_proto::v1;
use bridge_tests::{
    ADMIN_TOKEN, HubOptions, HubProcess, READER_TOKEN, WORKER_TOKEN, WorkerProcess, eventually,
    openapi::OpenApi, tokens_config,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// A client of one hub's HTTP API that checks every JSON answer against the OpenAPI document.
struct Api {
    base: String,
    http: reqwest::Client,
    doc: OpenApi,
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }
}

impl Api {
    async fn new(hub: &HubProcess) -> Self {
        let base = format!("http://{}", hub.http);
        let http = reqwest::Client::new();
        let doc = http
            .get(format!("{base}/api/openapi.json"))
            .send()
            .await
            .expect("GET /api/openapi.json")
            .json()
            .await
            .expect("the document is JSON");
        Self {
            base,
            http,
            doc: OpenApi::new(doc),
        }
    }

    /// `method route` with `{id}` / `{name}` filled in from `params`, then `query`; the body
    /// must match the documented schema for the status it came with.
    async fn call(
        &self,
        method: Method,
        route: &str,
        params: &[(&str, &str)],
        query: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Answer {
        let mut path = route.to_owned();
        for (name, value) in params {
            path = path.replace(&format!("{{{name}}}"), value);
        }
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}{query}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        let schema = self
            .doc
            .response_schema(method.as_str(), route, status.as_u16())
            .unwrap_or_else(|| panic!("{method} {route}: status {status} is not documented"));
        if let Err(mismatch) = self.doc.check(schema, &body, "$") {
            panic!("{method} {route} ({status}): {mismatch}\n{body:#}");
        }
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, route: &str, params: &[(&str, &str)], query: &str) -> Answer {
        self.call(Method::GET, route, params, query, None, None)
            .await
    }

    async fn put(&self, route: &str, params: &[(&str, &str)], body: &str) -> Answer {
        self.call(Method::PUT, route, params, "", None, Some(body))
            .await
    }
}

const WORKER: &str = "/api/workers/{id}";
const WORKER_CONTROL: &str = "/api/workers/{id}/control";
const POOL_CONTROL: &str = "/api/pools/{name}/control";
const ALL_CONTROL: &str = "/api/control";

/// What the gRPC API answers `UpdateControl` with for the same change, to compare messages.
async fn grpc_message(hub: &HubProcess, change: v1::update_control_request::Change) -> String {
    let mut client = hub.client().await;
    let request = v1::UpdateControlRequest {
        selector: Some(v1::Selector {
            target: Some(v1::selector::Target::All(true)),
        }),
        change: Some(change),
        wait_ms: 0,
        for_ms: 0,
    };
    client
        .raw()
        .update_control(request)
        .await
        .expect_err("the change is invalid")
        .message()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_good_and_bad_input_as_the_grpc_api_does() {
    let hub = HubProcess::start();
    let api = Api::new(&hub).await;
    let _worker = WorkerProcess::start(&hub.url, "gpu-1", "llama", &["--simulate", "20"]);
    let id = [("id", "gpu-1")];
    let pool = [("name", "llama")];

    // Reading workers.
    let listed = eventually("gpu-1 to be listed as connected", WAIT, || async {
        let answer = api.get("/api/workers", &[], "").await;
        let workers = answer.body["workers"].as_array()?.clone();
        workers
            .into_iter()
            .find(|w| w["id"] == "gpu-1" && w["connected"] == true && w["events_received"] != 0)
    })
    .await;
    assert_eq!(listed["pool"], "llama");
    let in_pool = api.get("/api/workers", &[], "?pool=llama").await;
    assert_eq!(in_pool.body["workers"].as_array().map(Vec::len), Some(1));
    let other_pool = api.get("/api/workers", &[], "?pool=mistral").await;
    assert_eq!(other_pool.body["workers"], json!([]));
    let empty_pool = api.get("/api/workers", &[], "?pool=").await;
    assert_eq!(empty_pool.status, StatusCode::BAD_REQUEST);
    let typo = api.get("/api/workers", &[], "?pol=llama").await;
    assert_eq!(typo.status, StatusCode::BAD_REQUEST);
    assert!(typo.message().contains("unknown query parameter `pol`"));
    let one = api.get(WORKER, &id, "").await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.body["id"], "gpu-1");
    let ghost = api.get(WORKER, &[("id", "ghost")], "").await;
    assert_eq!(ghost.status, StatusCode::NOT_FOUND);
    assert_eq!(ghost.body["error"]["status"], "NOT_FOUND");
    assert_eq!(ghost.body["error"]["code"], 404);
    assert!(
        ghost.message().contains("no worker `ghost`"),
        "{}",
        ghost.body
    );

    // A change reaches the worker, which applies it, as the gRPC API and the CLI show.
    let changed = api
        .put(
            WORKER_CONTROL,
            &id,
            r#"{"sampling_rate": 0.25, "wait_ms": 10000}"#,
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    let version = changed.body["version"].as_u64().expect("version");
    assert_eq!(changed.body["targets"][0]["worker_id"], "gpu-1");
    assert_eq!(changed.body["targets"][0]["applied"], true);
    let mut client = hub.client().await;
    let info = bridge_tests::worker_info(&mut client, "gpu-1")
        .await
        .expect("gpu-1");
    assert!(info.applied_version >= Some(version), "{info:?}");
    assert_eq!(info.control.as_ref().map(|c| c.sampling_rate), Some(0.25));
    let shown = api.get(WORKER_CONTROL, &id, "").await;
    assert_eq!(shown.body["effective"]["sampling_rate"], 0.25);
    assert_eq!(shown.body["worker"]["sampling_rate"], 0.25);

    // Pools and all workers; per-pattern rates; filters; toggles.
    let filtered = api
        .put(
            POOL_CONTROL,
            &pool,
            r#"{"allowed_events": ["inference.>"], "blocked_events": ["debug.>"]}"#,
        )
        .await;
    assert_eq!(filtered.status, StatusCode::OK, "{}", filtered.body);
    let shown = api.get(POOL_CONTROL, &pool, "").await;
    assert_eq!(
        shown.body["pool"]["filter"]["allow"],
        json!(["inference.>"])
    );
    let per_pattern = api
        .put(
            ALL_CONTROL,
            &[],
            r#"{"sampling_rate": 0.5, "event_patterns": ["gpu.>"]}"#,
        )
        .await;
    assert_eq!(per_pattern.status, StatusCode::OK, "{}", per_pattern.body);
    let off = api
        .put(ALL_CONTROL, &[], r#"{"enabled": false, "wait_ms": 10000}"#)
        .await;
    assert_eq!(off.body["targets"][0]["applied"], true, "{}", off.body);
    let shown = api.get(ALL_CONTROL, &[], "").await;
    assert_eq!(shown.body["effective"]["enabled"], false);
    assert_eq!(shown.body["effective"]["rules"]["gpu.>"], 0.5);
    api.put(ALL_CONTROL, &[], r#"{"enabled": true}"#).await;

    // DELETE forgets a level's own settings: the worker inherits the global rate again.
    let reset = api
        .call(
            Method::DELETE,
            WORKER_CONTROL,
            &id,
            "?wait_ms=10000",
            None,
            None,
        )
        .await;
    assert_eq!(reset.status, StatusCode::OK, "{}", reset.body);
    assert_eq!(reset.body["targets"][0]["applied"], true);
    let shown = api.get(WORKER_CONTROL, &id, "").await;
    assert_eq!(shown.body["effective"]["sampling_rate"], 1.0);
    assert_eq!(shown.body["worker"]["sampling_rate"], Value::Null);
    let bad_wait = api
        .call(
            Method::DELETE,
            POOL_CONTROL,
            &pool,
            "?wait_ms=soon",
            None,
            None,
        )
        .await;
    assert_eq!(bad_wait.status, StatusCode::BAD_REQUEST);
    assert!(bad_wait.message().contains("wait_ms"), "{}", bad_wait.body);

    // Invalid changes: the gRPC API's messages, word for word.
    use v1::update_control_request::Change;
    let out_of_range = api.put(ALL_CONTROL, &[], r#"{"sampling_rate": 1.5}"#).await;
    assert_eq!(out_of_range.status, StatusCode::BAD_REQUEST);
    assert_eq!(out_of_range.body["error"]["status"], "INVALID_ARGUMENT");
    let grpc = grpc_message(
        &hub,
        Change::Sampling(v1::TelemetrySamplingUpdate {
            sampling_rate: 1.5,
            event_patterns: vec![],
        }),
    )
    .await;
    assert_eq!(out_of_range.message(), grpc);
    let bad_pattern = api
        .put(
            POOL_CONTROL,
            &pool,
            r#"{"allowed_events": ["inference.>", "a..b"]}"#,
        )
        .await;
    let grpc = grpc_message(
        &hub,
        Change::Filter(v1::TelemetryEventFilter {
            allowed_events: vec!["inference.>".into(), "a..b".into()],
            blocked_events: vec![],
        }),
    )
    .await;
    assert_eq!(bad_pattern.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_pattern.message(), grpc);
    for (body, says) in [
        (r#"{"sampling_rate": 0.5, "enabled": true}"#, "set one of"),
        ("{}", "set one of"),
        (r#"{"event_patterns": ["a.>"]}"#, "needs a sampling_rate"),
        (r#"{"sampling_rat": 0.5}"#, "unknown field `sampling_rat`"),
        (r#"{"sampling_rate": "half"}"#, "invalid type"),
        (r#"{"sampling_rate": 0.5"#, "EOF"),
        ("", "EOF"),
        (r#"[0.5]"#, "expected a JSON object"),
    ] {
        let answer = api.put(WORKER_CONTROL, &id, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            answer.message().contains(says),
            "{body}: {}",
            answer.message()
        );
    }
    let huge = format!(r#"{{"allowed_events": ["{}"]}}"#, "a".repeat(100_000));
    let too_large = api.put(ALL_CONTROL, &[], &huge).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    let ghost = api
        .put(WORKER_CONTROL, &[("id", "ghost")], r#"{"enabled": false}"#)
        .await;
    assert_eq!(ghost.status, StatusCode::NOT_FOUND);

    // Routes and methods that do not exist.
    let wrong_method = api
        .http
        .post(format!("{}/api/control", api.base))
        .send()
        .await
        .expect("POST");
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    let nowhere = api
        .http
        .get(format!("{}/api/nowhere", api.base))
        .send()
        .await
        .expect("GET");
    assert_eq!(nowhere.status(), StatusCode::NOT_FOUND);
    let nowhere: Value = nowhere.json().await.expect("JSON error");
    assert_eq!(nowhere["error"]["status"], "NOT_FOUND");
    let invalid_events = api
        .call(
            Method::GET,
            "/api/events",
            &[],
            "?pattern=a.>.b",
            None,
            None,
        )
        .await;
    assert_eq!(invalid_events.status, StatusCode::BAD_REQUEST);
    assert!(invalid_events.message().contains("patterns[0]"));

    // Every change was logged once, on one line saying what, to whom, and through which API.
    let log = hub.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("control changed"))
        .collect();
    assert_eq!(lines.len(), 6, "{log}");
    assert!(
        lines[0].contains("worker gpu-1")
            && lines[0].contains("sampling 0.25")
            && lines[0].contains("via=\"http\""),
        "{}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_same_tokens_and_roles_as_grpc() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some(tokens_config()),
        ..Default::default()
    });
    let api = Api::new(&hub).await;
    let (worker, reader, admin) = (WORKER_TOKEN, READER_TOKEN, ADMIN_TOKEN);
    let _gpu = WorkerProcess::start(
        &hub.url,
        "gpu-1",
        "llama",
        &["--simulate", "5", "--token", worker],
    );
    eventually("gpu-1 to connect", WAIT, || async {
        let answer = api
            .call(
                Method::GET,
                WORKER,
                &[("id", "gpu-1")],
                "",
                Some(admin),
                None,
            )
            .await;
        (answer.body["connected"] == true).then_some(())
    })
    .await;

    let reads: [(&str, &[(&str, &str)]); 5] = [
        ("/api/workers", &[]),
        (WORKER, &[("id", "gpu-1")]),
        (WORKER_CONTROL, &[("id", "gpu-1")]),
        (POOL_CONTROL, &[("name", "llama")]),
        (ALL_CONTROL, &[]),
    ];
    for (route, params) in reads {
        let call = |token| api.call(Method::GET, route, params, "", token, None);
        let none = call(None).await;
        assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{route}");
        assert_eq!(none.body["error"]["status"], "UNAUTHENTICATED");
        assert_eq!(
            none.headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer"),
            "{route}"
        );
        assert_eq!(
            call(Some("not-a-token-of-this-hub")).await.status,
            StatusCode::UNAUTHORIZED,
            "{route}"
        );
        let denied = call(Some(worker)).await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN, "{route}");
        assert_eq!(denied.body["error"]["status"], "PERMISSION_DENIED");
        assert!(denied.message().contains("token `fleet` has role worker"));
        assert_eq!(call(Some(reader)).await.status, StatusCode::OK, "{route}");
        assert_eq!(call(Some(admin)).await.status, StatusCode::OK, "{route}");
    }
    let changes: [(&str, &[(&str, &str)]); 3] = [
        (WORKER_CONTROL, &[("id", "gpu-1")]),
        (POOL_CONTROL, &[("name", "llama")]),
        (ALL_CONTROL, &[]),
    ];
    for (route, params) in changes {
        for method in [Method::PUT, Method::DELETE] {
            let body = (method == Method::PUT).then_some(r#"{"sampling_rate": 0.5}"#);
            let call = |token| api.call(method.clone(), route, params, "", token, body);
            assert_eq!(call(None).await.status, StatusCode::UNAUTHORIZED);
            assert_eq!(call(Some(worker)).await.status, StatusCode::FORBIDDEN);
            let reader_denied = call(Some(reader)).await;
            assert_eq!(
                reader_denied.status,
                StatusCode::FORBIDDEN,
                "{method} {route}"
            );
            assert!(
                reader_denied
                    .message()
                    .contains("token `dashboards` has role reader")
            );
            let done = call(Some(admin)).await;
            assert_eq!(
                done.status,
                StatusCode::OK,
                "{method} {route}: {}",
                done.body
            );
        }
    }
    // The health checks and the API description need no token; metrics do.
    for path in ["/healthz", "/readyz", "/api/openapi.json"] {
        let status = api
            .http
            .get(format!("{}{path}", api.base))
            .send()
            .await
            .expect("GET")
            .status();
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // Server-sent events: a header, or `token` in the query for EventSource.
    let events = |query: &str, token: Option<&str>| {
        let mut request = api.http.get(format!("{}/api/events{query}", api.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(
        events("", None).await.expect("GET").status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        events(&format!("?token={worker}"), None)
            .await
            .expect("GET")
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        events("", Some(reader)).await.expect("GET").status(),
        StatusCode::OK
    );
    assert_eq!(
        events(&format!("?token={reader}"), None)
            .await
            .expect("GET")
            .status(),
        StatusCode::OK
    );

    // The log names the token holder of every change and never a token.
    let log = hub.log();
    let changes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("control changed"))
        .collect();
    assert_eq!(changes.len(), 6, "{log}");
    assert!(
        changes
            .iter()
            .all(|l| l.contains("token=\"oncall\"") || l.contains("token=oncall")),
        "{changes:#?}"
    );
    for token in [worker, reader, admin] {
        assert!(!log.contains(token), "a token appears in the hub's log");
    }
}

/// `?label=KEY=VALUE` on `/api/control` addresses a label level (the answer lists the matching
/// workers only, and they apply it), `/api/workers?label=` lists them, and a bad label is a 400
/// naming it, as the gRPC API says it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_address_a_label_level_and_filter_the_worker_list() {
    let hub = HubProcess::start();
    let api = Api::new(&hub).await;
    let _a = WorkerProcess::start(&hub.url, "gpu-a", "llama", &["--label", "zone=a"]);
    let _b = WorkerProcess::start(&hub.url, "gpu-b", "llama", &["--label", "zone=b"]);
    eventually("both workers to connect", WAIT, || async {
        let answer = api.get("/api/workers", &[], "").await;
        (answer.body["workers"].as_array()?.len() == 2).then_some(())
    })
    .await;

    let answer = api
        .call(
            Method::PUT,
            ALL_CONTROL,
            &[],
            "?label=zone%3Da",
            None,
            Some(r#"{"sampling_rate": 0.5, "wait_ms": 10000}"#),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let targets = answer.body["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 1, "{}", answer.body);
    assert_eq!(targets[0]["worker_id"], "gpu-a");
    assert_eq!(targets[0]["applied"], true);

    let shown = api.get(ALL_CONTROL, &[], "?label=zone%3Da").await;
    assert_eq!(
        shown.body["effective"]["sampling_rate"], 0.5,
        "{}",
        shown.body
    );
    assert_eq!(
        shown.body["labels"][0]["labels"]["zone"], "a",
        "{}",
        shown.body
    );
    let shown = api.get(WORKER_CONTROL, &[("id", "gpu-b")], "").await;
    assert_eq!(shown.body["labels"], json!([]), "{}", shown.body);
    assert_eq!(
        shown.body["effective"]["sampling_rate"], 1.0,
        "{}",
        shown.body
    );

    let listed = api.get("/api/workers", &[], "?label=zone%3Db").await;
    let ids: Vec<&str> = listed.body["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(ids, ["gpu-b"]);

    for query in ["?label=Zone%3Da", "?label=zone"] {
        let bad = api.get(ALL_CONTROL, &[], query).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{query}");
        assert!(bad.message().starts_with("label: "), "{}", bad.message());
    }
    let bad = api
        .get(WORKER_CONTROL, &[("id", "gpu-a")], "?label=zone%3Da")
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let reset = api
        .call(
            Method::DELETE,
            ALL_CONTROL,
            &[],
            "?label=zone%3Da&wait_ms=5000",
            None,
            None,
        )
        .await;
    assert_eq!(reset.status, StatusCode::OK, "{}", reset.body);
    assert_eq!(reset.body["targets"][0]["worker_id"], "gpu-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_change_over_http_says_when_it_reverts_and_bad_durations_are_refused() {
    let hub = HubProcess::start();
    let api = Api::new(&hub).await;
    let pool = [("name", "llama")];
    let timed = api
        .put(
            POOL_CONTROL,
            &pool,
            r#"{"sampling_rate": 0.2, "for_ms": 600000}"#,
        )
        .await;
    assert_eq!(timed.status, StatusCode::OK, "{}", timed.body);
    assert!(
        timed.body["expires_at_ms"].as_u64().is_some(),
        "{}",
        timed.body
    );
    let shown = api.get(POOL_CONTROL, &pool, "").await;
    let entry = &shown.body["pool"]["timed"][0];
    assert_eq!(entry["setting"], "sampling_rate");
    assert_eq!(
        entry["reverts_to"],
        Value::Null,
        "the pool had no rate: inherited"
    );
    assert!(
        entry["expires_in_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 590_000 && ms <= 600_000),
        "{entry}"
    );
    let untimed = api.put(POOL_CONTROL, &pool, r#"{"enabled": false}"#).await;
    assert_eq!(untimed.body["expires_at_ms"], Value::Null);

    for body in [
        r#"{"enabled": true, "for_ms": 0}"#,
        r#"{"enabled": true, "for_ms": -5}"#,
        r#"{"enabled": true, "for_ms": "soon"}"#,
        r#"{"enabled": true, "for_ms": 2678400000}"#,
    ] {
        let refused = api.put(POOL_CONTROL, &pool, body).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            refused.message().starts_with("for_ms: "),
            "{}",
            refused.body
        );
    }
    let reset = api
        .call(
            Method::DELETE,
            POOL_CONTROL,
            &pool,
            "?for_ms=60000",
            None,
            None,
        )
        .await;
    assert_eq!(reset.status, StatusCode::BAD_REQUEST);
    assert!(
        reset.message().contains("a reset cannot be timed"),
        "{}",
        reset.body
    );
    // Nothing refused was applied: still off, the rate still timed.
    let shown = api.get(POOL_CONTROL, &pool, "").await;
    assert_eq!(shown.body["effective"]["enabled"], false);
    assert_eq!(
        shown.body["pool"]["timed"].as_array().map(Vec::len),
        Some(1)
    );
}

#[tokio::test]
async fn a_target_rate_over_http_is_shown_at_its_level_and_bad_goals_are_refused() {
    let hub = HubProcess::start();
    let api = Api::new(&hub).await;
    let pool = [("name", "llama")];
    for body in [
        r#"{"target_events_per_second": 0}"#,
        r#"{"target_events_per_second": -5}"#,
        r#"{"target_events_per_second": 2e9}"#,
        r#"{"target_events_per_second": 60, "sampling_rate": 0.5}"#,
        r#"{"target_events_per_second": 60, "for_ms": 60000}"#,
    ] {
        let refused = api.put(POOL_CONTROL, &pool, body).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{body}");
    }
    let set = api
        .put(POOL_CONTROL, &pool, r#"{"target_events_per_second": 60}"#)
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    let shown = api.get(POOL_CONTROL, &pool, "").await;
    assert_eq!(shown.body["pool"]["target_events_per_second"], 60.0);
    assert_eq!(
        shown.body["pool"]["sampling_rate"], 1.0,
        "from the rate it had"
    );
    let fixed = api
        .put(POOL_CONTROL, &pool, r#"{"sampling_rate": 0.5}"#)
        .await;
    assert_eq!(fixed.status, StatusCode::OK, "{}", fixed.body);
    let shown = api.get(POOL_CONTROL, &pool, "").await;
    assert_eq!(shown.body["pool"]["target_events_per_second"], Value::Null);
}
