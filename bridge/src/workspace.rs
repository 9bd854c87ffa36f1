//! Building the workspace's other binaries from a program that cargo runs: `bridge demo` runs
//! `worker` processes, and the benchmark and the integration tests run `bridge`.

use std::{ffi::OsString, path::Path};

/// How to run `cargo build` from a program cargo started so that it builds into that
/// program's own target directory and profile (`profile_dir`, `target/<profile>`), without
/// rebuilding back and forth what the outer build made.
#[derive(Debug, Clone, PartialEq)]
pub struct SiblingBuild {
    /// Arguments after `build`: the profile and the target directory.
    pub args: Vec<OsString>,
    /// Variables to remove from the environment: cargo describes the package it runs in
    /// `CARGO_PKG_*` and friends, and build scripts that watch them (ring's) would rebuild
    /// half the tree when they differ from what the outer build saw.
    pub remove_env: Vec<OsString>,
}

const PER_PACKAGE_ENV: [&str; 6] = [
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
];

/// The build for binaries beside the ones in `profile_dir`, given this process's environment.
pub fn sibling_build(profile_dir: &Path) -> SiblingBuild {
    sibling_build_in(profile_dir, std::env::vars_os().map(|(key, _)| key))
}

fn sibling_build_in(profile_dir: &Path, env: impl Iterator<Item = OsString>) -> SiblingBuild {
    let mut args = Vec::new();
    // Cargo names the directory after the profile, except that `dev` builds into `debug`.
    match profile_dir.file_name().and_then(|name| name.to_str()) {
        None | Some("debug") => {}
        Some("release") => args.push("--release".into()),
        Some(profile) => args.extend(["--profile".into(), profile.into()]),
    }
    // Explicit, because this cargo may not see how the outer one was told (`--target-dir`).
    if let Some(target_dir) = profile_dir.parent() {
        args.extend(["--target-dir".into(), target_dir.as_os_str().to_owned()]);
    }
    let remove_env = env
        .filter(|key| {
            let key = key.to_string_lossy();
            PER_PACKAGE_ENV.iter().any(|prefix| key.starts_with(prefix))
        })
        .collect();
    SiblingBuild { args, remove_env }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_in_the_same_profile_and_target_without_the_package_variables() {
        let env = ["CARGO_PKG_NAME", "CARGO", "PATH", "CARGO_MANIFEST_DIR"].map(OsString::from);
        let build = sibling_build_in(Path::new("/t/release"), env.into_iter());
        assert_eq!(
            build.args,
            ["--release", "--target-dir", "/t"].map(OsString::from)
        );
        assert_eq!(
            build.remove_env,
            ["CARGO_PKG_NAME", "CARGO_MANIFEST_DIR"].map(OsString::from)
        );
        let debug = sibling_build_in(Path::new("/t/debug"), std::iter::empty());
        assert_eq!(debug.args, ["--target-dir", "/t"].map(OsString::from));
        let custom = sibling_build_in(Path::new("/t/bench"), std::iter::empty());
        assert_eq!(custom.args[..2], ["--profile", "bench"].map(OsString::from));
    }
}
