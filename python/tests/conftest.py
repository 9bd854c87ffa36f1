"""A real `bridge serve` hub per test, and a tail of what it delivers.

The binaries come from BRIDGE_BIN_DIR (tests/tests/python_sdk.rs sets it to the cargo build's
directory), else target/debug of this repository.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import tempfile
import threading
import time
from typing import Callable, List, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN_DIR = pathlib.Path(os.environ.get("BRIDGE_BIN_DIR", ROOT / "target" / "debug"))
WAIT = 30.0


def bridge_bin() -> str:
    path = BIN_DIR / "bridge"
    if not path.exists():
        pytest.fail(f"{path} not found: build it (cargo build -p telemetry-bridge) or set BRIDGE_BIN_DIR")
    return str(path)


def eventually(what: str, check: Callable[[], object], timeout: float = WAIT) -> object:
    """Polls `check` until it returns something truthy; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


class Hub:
    """A `bridge serve` process on 127.0.0.1; restartable on the same address and state."""

    def __init__(self) -> None:
        self._temp = tempfile.TemporaryDirectory()
        self.state_dir = pathlib.Path(self._temp.name) / "state"
        self.log = pathlib.Path(self._temp.name) / "hub.log"
        self.proc: Optional[subprocess.Popen] = None
        self.tails: List["Tail"] = []
        self.addr = "127.0.0.1:0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [bridge_bin(), "serve", "--listen", self.addr, "--http", "127.0.0.1:0",
             "--state-dir", str(self.state_dir)],
            stdout=subprocess.PIPE,
            stderr=open(self.log, "ab"),
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first.startswith("listening on "), f"hub said {first!r}; log:\n{self.log.read_text()}"
        self.addr = first.split()[-1]
        self.http = self.proc.stdout.readline().split()[-1]  # http on ADDR

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as response:
            return response.read().decode()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [bridge_bin(), "--hub", self.url, *args], capture_output=True, text=True, timeout=WAIT
        )
        assert result.returncode == 0, f"bridge {' '.join(args)}: {result.stderr}"
        return result.stdout

    def tail(self, *args: str) -> "Tail":
        tail = Tail(self, list(args))
        self.tails.append(tail)
        return tail

    def close(self) -> None:
        for tail in self.tails:
            tail.stop()
        self.kill()
        self._temp.cleanup()


class Tail:
    """`bridge subscribe --format json`: the events the hub delivers, as dicts."""

    def __init__(self, hub: Hub, args: List[str]) -> None:
        before = subscribers(hub)
        self.events: List[dict] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [bridge_bin(), "--hub", hub.url, "subscribe", "--format", "json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        eventually("the tail to subscribe", lambda: subscribers(hub) > before)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.events.append(event)

    def named(self, name: str) -> List[dict]:
        with self._lock:
            return [e for e in self.events if e.get("event") == name]

    def wait_named(self, name: str, count: int = 1, timeout: float = WAIT) -> List[dict]:
        eventually(f"{count} {name} events", lambda: len(self.named(name)) >= count, timeout)
        return self.named(name)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Forwarder:
    """A TCP forwarder between a worker and a hub that the test opens and closes, so that the
    worker reconnects when the test is ready for it (e.g. once a tail follows a restarted
    hub), not whenever its backoff happens to fire. While closed it accepts and drops."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self._listener.getsockname()[1]
        self._target: Optional[str] = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def open(self, addr: str) -> None:
        with self._lock:
            self._target = addr

    def close(self) -> None:
        with self._lock:
            self._target = None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                target = self._target
            if target is None:
                client.close()
                continue
            host, port = target.rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._listener.close()


def subscribers(hub: Hub) -> int:
    for line in hub.metrics_text().splitlines():
        if line.startswith("bridge_subscribers "):
            return int(float(line.split()[-1]))
    return 0


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


@pytest.fixture
def connect(hub):
    """`tb.connect` to the test's hub, closed at the end of the test."""
    import telemetry_bridge as tb

    made = []

    def make(worker_id: str = "py-test", **kwargs):
        kwargs.setdefault("linger", 0.0)
        t = tb.connect(hub.url, worker_id=worker_id, **kwargs)
        made.append(t)
        return t

    yield make
    for t in made:
        if not t.closed:
            t.close(timeout=1.0)


def wait_connected(t) -> None:
    eventually("the link to connect", lambda: t.link_state == "connected")
