//! Bearer tokens with roles, and the worker identity a client certificate vouches for.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time against every
//! configured token, so neither the time a check takes nor a memory dump gives one away.

use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Status, metadata::MetadataMap};

use crate::config::{AuthConfig, Role};

/// What a call needs permission for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `StreamTelemetry`.
    Stream,
    /// `Subscribe`, `ListWorkers`, `GetControl`.
    Read,
    /// `UpdateControl`.
    Admin,
}

impl Access {
    fn needs(self) -> &'static str {
        match self {
            Access::Stream => "role worker or admin",
            Access::Read => "role reader or admin",
            Access::Admin => "role admin",
        }
    }
}

impl Role {
    pub fn permits(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Role::Admin, _) | (Role::Reader, Access::Read) | (Role::Worker, Access::Stream)
        )
    }

    fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }
}

/// Shortest token accepted: guessing one must be hopeless.
const MIN_TOKEN_LEN: usize = 16;

/// Checks callers' tokens against the configured ones.
pub struct Authenticator {
    tokens: Vec<Entry>,
}

struct Entry {
    digest: [u8; 32],
    name: String,
    role: Role,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.tokens.iter().map(|t| (&t.name, t.role)))
            .finish()
    }
}

impl Authenticator {
    /// Reads token files; errors name the token (never its value) and what is wrong.
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let mut tokens: Vec<Entry> = Vec::with_capacity(config.tokens.len());
        for token in &config.tokens {
            let value = if token.token_file.as_os_str().is_empty() {
                token.token.trim().to_owned()
            } else {
                read_token_file(&token.name, &token.token_file)?
            };
            if value.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "auth token `{}`: tokens must be at least {MIN_TOKEN_LEN} characters (e.g. from `openssl rand -hex 32`)",
                    token.name
                ));
            }
            let digest = digest(&value);
            if let Some(same) = tokens.iter().find(|t| t.digest == digest) {
                return Err(format!(
                    "auth tokens `{}` and `{}` are the same token; give each holder its own",
                    same.name, token.name
                ));
            }
            tokens.push(Entry {
                digest,
                name: token.name.clone(),
                role: token.role,
            });
        }
        Ok(Self { tokens })
    }

    /// Whether any token is configured (otherwise every call is allowed).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Allows the call, naming the token's holder, or says why not: UNAUTHENTICATED for a
    /// missing or unknown token, PERMISSION_DENIED for a role that does not allow `access`.
    pub fn check(&self, metadata: &MetadataMap, access: Access) -> Result<Option<&str>, Status> {
        if self.tokens.is_empty() {
            return Ok(None);
        }
        let presented = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(bearer)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this hub requires a token: pass --token or set BRIDGE_TOKEN (authorization: Bearer TOKEN)",
                )
            })?;
        let presented = digest(presented);
        // Every entry is compared, so the time taken does not depend on which one matched.
        let mut found: Option<&Entry> = None;
        for entry in &self.tokens {
            if bool::from(entry.digest.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or_else(|| Status::unauthenticated("the token is not valid"))?;
        if !entry.role.permits(access) {
            return Err(Status::permission_denied(format!(
                "token `{}` has role {}; this call needs {}",
                entry.name,
                entry.role.as_str(),
                access.needs()
            )));
        }
        Ok(Some(&entry.name))
    }
}

/// The token in `path`: its one non-empty line, surrounding whitespace ignored. A file of
/// several tokens is refused rather than read as one token with a newline in it, which no
/// client could ever send. Warns when others may read it.
fn read_token_file(name: &str, path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("auth token `{name}`: cannot read {}: {e}", path.display()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty());
    let token = lines.next().map(|(_, line)| line.trim().to_owned());
    if let Some((index, _)) = lines.next() {
        return Err(format!(
            "auth token `{name}`: {} line {}: a token file holds one token on one line; give each token its own [[auth.tokens]] entry and file",
            path.display(),
            index + 1
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(path)
            && metadata.permissions().mode() & 0o004 != 0
        {
            tracing::warn!(
                token = name,
                file = %path.display(),
                "a token file is readable by every user on this machine; restrict it (chmod 600)"
            );
        }
    }
    Ok(token.unwrap_or_default())
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// With mutual TLS, a worker may only stream as a name its certificate holds (a DNS subject
/// alternative name, checked the way a TLS client checks a server's name).
pub fn check_certificate_name(cert: &CertificateDer<'_>, worker_id: &str) -> Result<(), Status> {
    let denied = || {
        Status::permission_denied(format!(
            "worker id `{worker_id}` is not a name in the client certificate"
        ))
    };
    let name = ServerName::try_from(worker_id).map_err(|_| denied())?;
    let cert = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| Status::permission_denied(format!("unreadable client certificate: {e}")))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| denied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    fn config(tokens: &[(&str, Role, &str)]) -> AuthConfig {
        AuthConfig {
            tokens: tokens
                .iter()
                .map(|(name, role, token)| TokenConfig {
                    name: (*name).into(),
                    role: *role,
                    token: (*token).into(),
                    token_file: Default::default(),
                })
                .collect(),
        }
    }

    fn with_token(token: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", token.parse().expect("ascii"));
        metadata
    }

    #[test]
    fn roles_allow_exactly_their_calls() {
        let auth = Authenticator::new(&config(&[
            ("fleet", Role::Worker, "worker-token-0123456789"),
            ("grafana", Role::Reader, "reader-token-0123456789"),
            ("ops", Role::Admin, "admin-token-0123456789"),
        ]))
        .expect("valid");
        let code = |token: &str, access| {
            auth.check(&with_token(token), access)
                .map(|name| name.map(str::to_owned))
                .map_err(|s| s.code())
        };
        use tonic::Code::{PermissionDenied, Unauthenticated};
        let worker = "Bearer worker-token-0123456789";
        let reader = "bearer reader-token-0123456789";
        let admin = "Bearer  admin-token-0123456789 ";
        assert_eq!(code(worker, Access::Stream), Ok(Some("fleet".into())));
        assert_eq!(code(worker, Access::Read), Err(PermissionDenied));
        assert_eq!(code(worker, Access::Admin), Err(PermissionDenied));
        assert_eq!(code(reader, Access::Read), Ok(Some("grafana".into())));
        assert_eq!(code(reader, Access::Stream), Err(PermissionDenied));
        assert_eq!(code(reader, Access::Admin), Err(PermissionDenied));
        for access in [Access::Stream, Access::Read, Access::Admin] {
            assert_eq!(code(admin, access), Ok(Some("ops".into())));
            assert_eq!(
                code("Bearer wrong-token-0123456789", access),
                Err(Unauthenticated)
            );
            assert_eq!(
                code("Basic admin-token-0123456789", access),
                Err(Unauthenticated)
            );
            assert_eq!(
                auth.check(&MetadataMap::new(), access)
                    .map_err(|s| s.code()),
                Err(Unauthenticated)
            );
        }
    }

    #[test]
    fn no_tokens_means_open_and_bad_tokens_are_refused_at_start() {
        let open = Authenticator::new(&AuthConfig::default()).expect("valid");
        assert_eq!(
            open.check(&MetadataMap::new(), Access::Admin)
                .map_err(|s| s.code()),
            Ok(None)
        );
        let short = Authenticator::new(&config(&[("a", Role::Admin, "short")]));
        assert!(short.expect_err("too short").contains("at least 16"));
        let twice = Authenticator::new(&config(&[
            ("a", Role::Admin, "same-token-0123456789"),
            ("b", Role::Reader, "same-token-0123456789"),
        ]));
        assert!(twice.expect_err("duplicate").contains("`a` and `b`"));
    }

    #[test]
    fn denials_never_echo_the_token() {
        let auth = Authenticator::new(&config(&[(
            "fleet",
            Role::Worker,
            "worker-token-0123456789",
        )]))
        .expect("valid");
        let status = auth
            .check(&with_token("Bearer worker-token-0123456789"), Access::Admin)
            .expect_err("denied");
        assert!(!status.message().contains("worker-token"), "{status:?}");
        assert!(!format!("{auth:?}").contains("worker-token"));
    }
}
