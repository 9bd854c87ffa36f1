//! What every client of the hub needs to connect: how it proves who it is (a bearer token, TLS,
//! a client certificate), a failure as one readable line, and the name a participant goes by
//! when it is not given one.
//!
//! Shared by the worker link, the sidecar, the hub (a cluster node's name) and the `bridge`
//! command line, so that every client takes the same `--token` / `BRIDGE_TOKEN`, `--ca`,
//! `--cert` and `--key`, and reports a connection failure the same way.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use tonic::{
    metadata::AsciiMetadataValue,
    service::Interceptor,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

/// Client credentials, all optional, as command-line options of both binaries. `Debug` never
/// shows the token.
#[derive(Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ClientSecurity {
    /// Bearer token for the hub (sent as `authorization: Bearer TOKEN`).
    #[arg(long, global = true, env = "BRIDGE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) the hub's certificate must chain to [default: the public web roots,
    /// for https:// hubs].
    #[arg(long, global = true, env = "BRIDGE_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --key.
    #[arg(long, global = true, env = "BRIDGE_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, global = true, env = "BRIDGE_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,
}

impl fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSecurity")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

/// Credentials that cannot be used; the message names the file or the option.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ClientSecurity {
    /// The `authorization` header value, if a token is set.
    pub fn authorization(&self) -> Result<Option<AsciiMetadataValue>, SecurityError> {
        let Some(token) = self.token.as_deref() else {
            return Ok(None);
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(SecurityError::Invalid("the token is empty".into()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecurityError::Invalid(
                "the token must be printable ASCII without spaces".into(),
            ));
        }
        let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            SecurityError::Invalid("the token must be printable ASCII without spaces".into())
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// An interceptor that adds [`Self::authorization`] to every call.
    pub fn interceptor(&self) -> Result<Authorize, SecurityError> {
        Ok(Authorize(self.authorization()?))
    }

    /// Applies TLS settings to `endpoint`: for `https://` hubs, and whenever a CA or client
    /// certificate is given (which then requires `https://`).
    pub fn configure(&self, endpoint: Endpoint, url: &str) -> Result<Endpoint, SecurityError> {
        let https = url.starts_with("https://");
        let wants_tls = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        if !https {
            if wants_tls {
                return Err(SecurityError::Invalid(format!(
                    "--ca, --cert and --key need an https:// hub address, not `{url}`"
                )));
            }
            return Ok(endpoint);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?)),
            None => tls.with_webpki_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "client certificate")?,
                    read(key, "client key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(SecurityError::Invalid(
                    "--cert and --key go together (mutual TLS needs both)".into(),
                ));
            }
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| SecurityError::Invalid(format!("TLS settings: {e}")))
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Adds the bearer token (if any) to each request.
#[derive(Clone)]
pub struct Authorize(Option<AsciiMetadataValue>);

impl fmt::Debug for Authorize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Authorize")
            .field(&self.0.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Interceptor for Authorize {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An error and its causes on one line (`transport error: connection refused`), skipping
/// causes that the text already includes.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The machine's host name, or `worker-<pid>` when it cannot be read: the default worker id,
/// and a clustered hub's default node name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("worker-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let security = ClientSecurity {
            token: Some("s3cret".into()),
            ..Default::default()
        };
        assert!(!format!("{security:?}").contains("s3cret"));
        assert!(!format!("{:?}", security.interceptor().expect("valid")).contains("s3cret"));
    }

    #[test]
    fn unusable_tokens_and_tls_settings_are_refused_with_a_reason() {
        let token = |t: &str| ClientSecurity {
            token: Some(t.into()),
            ..Default::default()
        };
        assert!(token("  ").authorization().is_err());
        assert!(token("a b").authorization().is_err());
        assert!(token("tok\u{e9}n").authorization().is_err());
        let value = token("abc").authorization().expect("valid").expect("set");
        assert_eq!(value.to_str().expect("ascii"), "Bearer abc");

        let endpoint = || Endpoint::from_static("http://127.0.0.1:1");
        let with_ca = ClientSecurity {
            ca: Some("ca.pem".into()),
            ..Default::default()
        };
        let error = with_ca
            .configure(endpoint(), "http://127.0.0.1:1")
            .expect_err("plaintext with a CA");
        assert!(error.to_string().contains("https://"), "{error}");
        let missing = with_ca
            .configure(endpoint(), "https://127.0.0.1:1")
            .expect_err("no such file");
        assert!(missing.to_string().contains("ca.pem"), "{missing}");
        let half = ClientSecurity {
            cert: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(half.configure(endpoint(), "https://127.0.0.1:1").is_err());
    }
}
