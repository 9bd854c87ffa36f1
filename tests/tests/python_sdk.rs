//! The Python SDK (`python/`, package `telemetry_bridge`) against real hubs: its pytest suite
//! (`python/tests`), run with the Python that `./test.sh` installed the package into, so that
//! `cargo test --workspace` covers it. The suite starts its own `bridge serve` processes from
//! the binaries this test builds.

use std::process::Command;

use bridge_tests::{bin, repo_root, skip_without};

/// `BRIDGE_TEST_PYTHON` with `telemetry_bridge` and pytest importable, or `None` (skipped, said
/// on stderr) unless `BRIDGE_REQUIRE_PYTHON_SDK` is set, as `./test.sh` does.
fn python_with_sdk() -> Option<String> {
    let python = std::env::var("BRIDGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import telemetry_bridge, pytest"])
        .current_dir(std::env::temp_dir())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_without(
            "BRIDGE_REQUIRE_PYTHON_SDK",
            &format!("{python} lacks telemetry_bridge or pytest (pip install ./python pytest)"),
        );
        return None;
    }
    Some(python)
}

#[test]
fn python_sdk_pytest_suite_passes_against_a_real_hub() {
    let Some(python) = python_with_sdk() else {
        return;
    };
    let bridge = bin("bridge");
    let bin_dir = bridge.parent().expect("binaries directory");
    // Run from the tests directory, so that the package imported is the installed one and not
    // the source tree beside it (whose native module is not built in place).
    let output = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error::pytest.PytestUnraisableExceptionWarning",
            ".",
        ])
        .current_dir(repo_root().join("python/tests"))
        .env("BRIDGE_BIN_DIR", bin_dir)
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pytest failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // Print pytest's summary line (e.g. `12 passed in 14.1s`) with the test's output.
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains("passed"), "{stdout}");
    println!("python/tests: {summary}");
}
