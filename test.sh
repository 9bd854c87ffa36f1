#!/usr/bin/env bash
# Runs the whole test suite, as CI does: formatting, lints, and every test in the workspace.
# Needs only the Rust toolchain and python3; it installs what else the tests use (grpcio in a
# virtualenv; promtool, chromium, tmux and nats-server from Debian).
set -euo pipefail
cd "$(dirname "$0")"

# The interop test drives a Python client generated from the .proto (grpcio, grpcio-tools);
# the Python SDK's suite (tests/tests/python_sdk.rs) runs pytest against the package built here.
venv=target/pyenv
# The OTLP export tests receive with the official OpenTelemetry protobufs (opentelemetry-proto).
if ! "$venv/bin/python" -c 'import grpc, grpc_tools, opentelemetry.proto, pytest' 2>/dev/null; then
    echo "test.sh: installing grpcio, grpcio-tools, opentelemetry-proto and pytest into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools opentelemetry-proto pytest
fi
export BRIDGE_TEST_PYTHON="$PWD/$venv/bin/python"
export BRIDGE_REQUIRE_PYTHON=1 BRIDGE_REQUIRE_PYTHON_SDK=1

# The Python SDK, installed as a user would (`pip install ./python`), but built with the dev
# profile so that it shares target/debug with `cargo test` below instead of building every
# dependency again for release.
echo "test.sh: building and installing the Python SDK (python/) into $venv"
sdk_start=$SECONDS
MATURIN_PEP517_ARGS="--profile dev" \
    "$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./python
echo "test.sh: Python SDK built and installed in $((SECONDS - sdk_start)) s"

# Debian packages the tests drive: promtool lints /metrics (package prometheus), headless
# Chromium opens an EventSource against the hub, tmux runs `bridge top` as a terminal would,
# nats-server carries events between hubs in cluster mode.
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v tmux >/dev/null || missing+=(tmux)
command -v nats-server >/dev/null || missing+=(nats-server)
# The README's examples pipe curl into jq.
command -v curl >/dev/null || missing+=(curl)
command -v jq >/dev/null || missing+=(jq)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]} (Debian)"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export BRIDGE_REQUIRE_PROMTOOL=1 BRIDGE_REQUIRE_CHROMIUM=1 BRIDGE_REQUIRE_TMUX=1 BRIDGE_REQUIRE_NATS=1
export BRIDGE_REQUIRE_README_TOOLS=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
