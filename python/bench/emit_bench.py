"""What `emit` costs the caller, from Python: the SDK with telemetry disabled, sampled out and
queued (connected to a real hub, which confirms what it gets), and the telemetry-stream seed's
pure-Python `GrpcTelemetryEmitter.emit` (tests/python/seed_emitter.py) in the same run.

"queued" is timed as the seed's emit is, into the buffer with nothing draining it meanwhile;
"queued, hub connected" while the I/O thread sends and a local hub confirms, on the same cores.

Every case makes the same call, `emit("cache.hit", {"bytes": 4096}, {"tier": "l2"})`, timed with
`time.perf_counter_ns` over a loop of many calls; a figure is the median of several runs, in
nanoseconds per call, loop included (the loop alone is reported too).

usage (from the repository root, after `pip install ./python` into a venv with grpcio-tools):
    cargo build --release -p telemetry-bridge
    target/pyenv/bin/python python/bench/emit_bench.py [--calls 200000] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


#: Called before every timed run: lets the hub catch up with what the last run sent, so that a
#: run does not pay for its predecessor's backlog.
SETTLE = [lambda: None]


def median_ns_per_call(run_once, calls: int, runs: int) -> float:
    results = []
    for _ in range(runs):
        SETTLE[0]()
        results.append(run_once(calls) / calls)
    return statistics.median(results)


def loop_of(emit):
    def run(calls: int) -> int:
        measurements = {"bytes": 4096}
        metadata = {"tier": "l2"}
        begin = time.perf_counter_ns()
        for _ in range(calls):
            emit("cache.hit", measurements, metadata)
        return time.perf_counter_ns() - begin

    return run


def literal_loop_of(emit):
    """As an app writes it: the dicts built at each call."""

    def run(calls: int) -> int:
        begin = time.perf_counter_ns()
        for _ in range(calls):
            emit("cache.hit", measurements={"bytes": 4096}, metadata={"tier": "l2"})
        return time.perf_counter_ns() - begin

    return run


def seed_emitter():
    """The seed's emitter over stubs generated from bridge.proto, with no stream: its emit()
    builds the protobuf event and queues it, as it does for every event."""
    generated = tempfile.mkdtemp(prefix="seed-stubs-")
    from grpc_tools import protoc

    proto = ROOT / "proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{proto}",
            f"--python_out={generated}",
            f"--grpc_python_out={generated}",
            str(proto / "telemetry/bridge/v1/bridge.proto"),
        ]
    )
    assert code == 0, "protoc failed"
    sys.path[:0] = [generated, str(ROOT / "tests/python")]
    import seed_emitter  # noqa: E402

    return seed_emitter.GrpcTelemetryEmitter(None)


def seed_run(emitter):
    """Times batches that fit the seed's queue (1,000), emptying it between them untimed, so
    that every timed call takes the queued path."""
    batch = 1000

    def run(calls: int) -> int:
        total = 0
        measurements = {"bytes": 4096}
        metadata = {"tier": "l2"}
        emit = emitter.emit
        for _ in range(calls // batch):
            begin = time.perf_counter_ns()
            for _ in range(batch):
                emit("cache.hit", measurements, metadata)
            total += time.perf_counter_ns() - begin
            queue = emitter.event_queue
            while not queue.empty():
                queue.get_nowait()
        return total

    return run


def seed_full_run(emitter):
    """The seed's whole per-event cost in the interpreter, as a lower bound: emit() and then what
    its stream loop does with the event on the same thread (take it off the queue, serialize
    it; grpc's own write is not counted)."""
    batch = 1000

    def run(calls: int) -> int:
        measurements = {"bytes": 4096}
        metadata = {"tier": "l2"}
        emit = emitter.emit
        queue = emitter.event_queue
        begin = time.perf_counter_ns()
        for _ in range(calls // batch):
            for _ in range(batch):
                emit("cache.hit", measurements, metadata)
            while not queue.empty():
                queue.get_nowait().SerializeToString()
        return time.perf_counter_ns() - begin

    return run


class Hub:
    def __init__(self, bridge: str) -> None:
        self.state = tempfile.mkdtemp(prefix="bench-hub-")
        self.bridge = bridge
        self.proc = subprocess.Popen(
            [bridge, "serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
             "--state-dir", self.state],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.url = "http://" + self.proc.stdout.readline().split()[-1]
        self.proc.stdout.readline()

    def cli(self, *args: str) -> None:
        subprocess.run([self.bridge, "--hub", self.url, *args], check=True,
                       stdout=subprocess.DEVNULL, timeout=30)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--bridge", default=str(ROOT / "target/release/bridge"))
    args = parser.parse_args()

    import telemetry_bridge as tb

    hub = Hub(args.bridge)
    figures = {}
    try:
        # A buffer that holds every run, so that "queued" times the push, not evictions.
        t = tb.connect(hub.url, worker_id="bench", buffer_events=4_000_000)
        while t.link_state != "connected":
            time.sleep(0.01)

        def settle() -> None:
            deadline = time.monotonic() + 60
            while t.stats()["buffered"] and time.monotonic() < deadline:
                time.sleep(0.01)

        SETTLE[0] = settle
        loop = loop_of(lambda name, m, md: None)
        figures["loop alone"] = median_ns_per_call(loop, args.calls, args.runs)

        # As the seed's emit is measured: into the buffer, with nothing draining it meanwhile
        # (its hub is unreachable, so its I/O thread sleeps in backoff).
        idle = tb.connect("http://127.0.0.1:9", worker_id="bench-idle", buffer_events=4_000_000)
        figures["queued"] = median_ns_per_call(loop_of(idle.emit), args.calls, args.runs)
        assert idle.stats()["accepted"] == args.calls * args.runs
        idle.close(timeout=0)
        # And as an app runs: the I/O thread sending and the hub confirming, on the same cores.
        figures["queued, hub connected"] = median_ns_per_call(
            loop_of(t.emit), args.calls, args.runs)
        figures["queued, dicts built per call"] = median_ns_per_call(
            literal_loop_of(t.emit), args.calls, args.runs)
        before = t.stats()
        hub.cli("sample", "bench", "0")
        figures["sampled out"] = median_ns_per_call(loop_of(t.emit), args.calls, args.runs)
        after = t.stats()
        assert after["accepted"] == before["accepted"], "sampled out, yet accepted"
        hub.cli("toggle", "bench", "off")
        figures["disabled"] = median_ns_per_call(loop_of(t.emit), args.calls, args.runs)
        assert t.stats()["disabled"] >= args.calls * args.runs
        hub.cli("toggle", "bench", "on")
        hub.cli("sample", "bench", "1")
        with_span = t.span("bench")
        with with_span:
            figures["queued, inside a span"] = median_ns_per_call(
                loop_of(t.emit), args.calls, args.runs)
        stats = t.close(timeout=30)
        assert stats["dropped"] == 0 and stats["buffered"] == 0, stats

        seed = seed_emitter()
        figures["seed GrpcTelemetryEmitter.emit (queued)"] = median_ns_per_call(
            seed_run(seed), args.calls, args.runs)
        figures["seed emit + dequeue + serialize"] = median_ns_per_call(
            seed_full_run(seed), args.calls, args.runs)
        seed.sampling_rate = 0.0
        figures["seed, sampled out"] = median_ns_per_call(
            loop_of(seed.emit), args.calls, args.runs)
        seed.enabled = False
        figures["seed, disabled"] = median_ns_per_call(loop_of(seed.emit), args.calls, args.runs)
    finally:
        hub.stop()

    ratio = figures["seed GrpcTelemetryEmitter.emit (queued)"] / figures["queued"]
    full_ratio = figures["seed emit + dequeue + serialize"] / figures["queued"]
    width = max(map(len, figures))
    for name, ns in figures.items():
        print(f"{name:<{width}}  {ns:8.0f} ns/call")
    print(f"{'seed emit / SDK queued':<{width}}  {ratio:8.1f}x")
    print(f"{'seed emit+dequeue+serialize / SDK queued':<{width}}  {full_ratio:8.1f}x")
    print(json.dumps({"ns_per_call": {k: round(v, 1) for k, v in figures.items()},
                      "seed_over_queued": round(ratio, 2),
                      "seed_full_over_queued": round(full_ratio, 2), "calls": args.calls,
                      "runs": args.runs, "python": sys.version.split()[0],
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
