//! Which `Host` names the HTTP port answers to: a guard against DNS rebinding.
//!
//! A web page can point a name it controls at 127.0.0.1 and then call the hub from the
//! visitor's browser as if it were its own site; the only trace is the `Host` header, which
//! names the attacker's domain. A hub without tokens would obey such a page, so it answers only
//! to loopback names (`localhost`, `127.0.0.1` and the rest of 127/8, `[::1]`, with any port)
//! and to those listed in `hub.http_allowed_hosts`. With tokens the page has no token to send,
//! so every name is accepted.

use std::{net::IpAddr, sync::Arc};

use axum::{
    Router,
    extract::Request,
    http::{StatusCode, header},
    middleware::{self, Next},
    response::IntoResponse,
};

use super::ApiError;
use crate::hub::Hub;

/// `router`, refusing requests for names the hub does not answer to (403, `PERMISSION_DENIED`).
pub fn guard(router: Router, hub: &Hub) -> Router {
    if hub.auth().enabled() {
        return router;
    }
    let allowed: Arc<[String]> = hub
        .config()
        .hub
        .http_allowed_hosts
        .iter()
        .map(|host| normalise(host))
        .collect();
    if allowed.iter().any(|host| host == "*") {
        return router;
    }
    router.layer(middleware::from_fn(move |request: Request, next: Next| {
        let allowed = allowed.clone();
        async move {
            match refused_host(&request, &allowed) {
                Some(host) => refusal(&host).into_response(),
                None => next.run(request).await,
            }
        }
    }))
}

/// A host `request` names that the hub must not answer to. Every name counts: the target's
/// authority and each `Host` header (a request with two is answered only if both are fine).
/// A browser always sends `Host`; a request naming no host at all is no rebinding attack.
fn refused_host(request: &Request, allowed: &[String]) -> Option<String> {
    let authority = request
        .uri()
        .authority()
        .map(|authority| authority.host().to_owned());
    let headers = request
        .headers()
        .get_all(header::HOST)
        .iter()
        .map(|value| host_of(&String::from_utf8_lossy(value.as_bytes())).to_owned());
    authority
        .into_iter()
        .chain(headers)
        .map(|host| normalise(&host))
        .find(|host| !is_loopback(host) && !allowed.contains(host))
}

fn refusal(host: &str) -> ApiError {
    let shown: String = host
        .chars()
        .take(256)
        .flat_map(char::escape_debug)
        .collect();
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "this hub has no tokens, so it answers only to loopback names (localhost, 127.0.0.1, [::1]) and to hub.http_allowed_hosts, not to `{shown}` (a guard against DNS rebinding)"
        ),
    )
}

/// The host of a `Host` header value: without the port, brackets kept around IPv6 literals.
fn host_of(value: &str) -> &str {
    let value = value.trim();
    if value.starts_with('[') {
        return value.find(']').map_or(value, |end| &value[..=end]);
    }
    value.rsplit_once(':').map_or(value, |(host, _)| host)
}

/// Lower case, without a trailing dot (`localhost.` is `localhost`).
fn normalise(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn is_loopback(host: &str) -> bool {
    if host == "localhost" {
        return true;
    }
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    literal.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(host: &str, allowed: &[&str]) -> bool {
        let allowed: Vec<String> = allowed.iter().map(|h| normalise(h)).collect();
        let request = Request::builder()
            .uri("/api/workers")
            .header(header::HOST, host)
            .body(axum::body::Body::empty())
            .unwrap();
        refused_host(&request, &allowed).is_some()
    }

    #[test]
    fn loopback_names_with_any_port_are_answered() {
        for host in [
            "localhost",
            "localhost:9464",
            "LOCALHOST.:80",
            "127.0.0.1",
            "127.0.0.1:9464",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:9464",
        ] {
            assert!(!refused(host, &[]), "{host}");
        }
    }

    #[test]
    fn other_names_are_refused_unless_listed() {
        for host in [
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.5:9464",
            "[::2]:9464",
            "",
        ] {
            assert!(refused(host, &[]), "{host}");
        }
        assert!(!refused("bridge.internal:9464", &["Bridge.Internal"]));
        assert!(!refused("10.0.0.5:9464", &["10.0.0.5"]));
        assert!(refused("other.internal", &["bridge.internal"]));
    }

    #[test]
    fn every_host_header_must_be_answerable() {
        let request = Request::builder()
            .uri("/api/workers")
            .header(header::HOST, "localhost")
            .header(header::HOST, "evil.example")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(refused_host(&request, &[]).as_deref(), Some("evil.example"));
        let absolute = Request::builder()
            .uri("http://evil.example/api/workers")
            .header(header::HOST, "localhost")
            .body(axum::body::Body::empty())
            .unwrap();
        assert!(refused_host(&absolute, &[]).is_some());
        let none = Request::builder()
            .uri("/api/workers")
            .body(axum::body::Body::empty())
            .unwrap();
        assert!(refused_host(&none, &[]).is_none());
    }
}
