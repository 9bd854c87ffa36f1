"""The Python SDK against a real hub: what arrives, control, spans, decorators, faults, fork."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import pytest

import telemetry_bridge as tb
from conftest import WAIT, Forwarder, eventually, wait_connected


def test_events_arrive_with_their_types(hub, connect):
    tail = hub.tail("--worker", "py-types")
    t = connect("py-types", pool="llama-70b", labels={"zone": "b"})
    t.emit(
        "cache.hit",
        measurements={"bytes": 4096, "ratio": 0.25, "whole": 2.0, "state": "warm", "flag": True},
        metadata={"tier": "l2", "shard": 7},
        correlation_id="req-1",
    )
    t.emit("cache.miss")
    (hit,) = tail.wait_named("cache.hit")
    m = hit["measurements"]
    assert m["bytes"] == 4096 and type(m["bytes"]) is int
    assert m["ratio"] == 0.25 and type(m["ratio"]) is float
    assert type(m["whole"]) is float, "a float stays a float on the wire"
    assert m["state"] == "warm" and m["flag"] == 1
    assert hit["metadata"] == {"tier": "l2", "shard": "7"}
    assert hit["correlation_id"] == "req-1"
    assert hit["pool"] == "llama-70b" and hit["worker_id"] == "py-types"
    assert tail.wait_named("cache.miss")[0]["sequence"] == hit["sequence"] + 1
    workers = hub.cli("workers")
    assert "py-types" in workers and "llama-70b" in workers


def test_sample_is_acknowledged_and_applied(hub, connect):
    t = connect("py-sampled")
    wait_connected(t)
    out = hub.cli("sample", "py-sampled", "0.25")
    assert re.search(r"py-sampled: sampling 0\.25 applied in", out), out
    for i in range(4000):
        t.emit("work.item", measurements={"i": i}, correlation_id=f"req-{i}")
    stats = t.stats()
    kept = stats["accepted"] / 4000
    assert 0.18 < kept < 0.32, stats
    assert stats["sampled_out"] + stats["accepted"] == 4000
    # Consistent sampling: the same ids are kept again.
    t2 = connect("py-sampled-2")
    wait_connected(t2)
    hub.cli("sample", "py-sampled-2", "0.25")
    for i in range(4000):
        t2.emit("work.item", measurements={"i": i}, correlation_id=f"req-{i}")
    assert t2.stats()["accepted"] == stats["accepted"]


def test_toggle_and_filters_apply(hub, connect):
    tail = hub.tail("--worker", "py-control")
    t = connect("py-control")
    wait_connected(t)
    assert "applied" in hub.cli("filter", "py-control", "--block", "noisy.>")
    t.emit("noisy.debug")
    t.emit("useful.event")
    tail.wait_named("useful.event")
    assert tail.named("noisy.debug") == []
    assert t.stats()["filtered"] == 1
    assert "applied" in hub.cli("toggle", "py-control", "off")
    for _ in range(10):
        t.emit("useful.event")
    assert t.stats()["disabled"] == 10
    assert "applied" in hub.cli("toggle", "py-control", "on")
    t.emit("useful.event", metadata={"after": "on"})
    eventually("the event after toggling on", lambda: any(
        e["metadata"].get("after") == "on" for e in tail.named("useful.event")))
    assert len(tail.named("useful.event")) == 2


def test_span_events_carry_measurements_and_trace_ids(hub, connect):
    tail = hub.tail("--worker", "py-spans")
    t = connect("py-spans")
    with t.span("inference", model="llama-70b") as span:
        span.set(output_tokens=512, time_to_first_token_ns=1234)
        span.set_tokens(input=40)
        span.set_metadata(model_version="3")
        t.emit("inference.first_token", measurements={"ns": 1})
        with t.span("decode") as child:
            child_header = child.traceparent
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with t.span("rpc.serve", traceparent=incoming) as continued:
        pass
    start = tail.wait_named("inference.start")[0]
    stop = tail.wait_named("inference.stop")[0]
    assert start["metadata"] == {"model": "llama-70b"}
    assert stop["measurements"]["output_tokens"] == 512
    assert stop["measurements"]["time_to_first_token_ns"] == 1234
    assert stop["measurements"]["input_tokens"] == 40
    assert stop["measurements"]["duration_ns"] > 0
    assert stop["metadata"] == {"model": "llama-70b", "model_version": "3", "result": "success"}
    for event in (start, stop):
        assert event["trace_id"] == span.trace_id and event["span_id"] == span.span_id
        assert event["correlation_id"] == span.trace_id
    inner = tail.wait_named("inference.first_token")[0]
    assert inner["trace_id"] == span.trace_id and inner["span_id"] == span.span_id
    decode = tail.wait_named("decode.stop")[0]
    assert decode["trace_id"] == span.trace_id
    assert decode["parent_span_id"] == span.span_id
    assert child_header == f"00-{span.trace_id}-{decode['span_id']}-01"
    served = tail.wait_named("rpc.serve.stop")[0]
    assert served["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert served["parent_span_id"] == "b7ad6b7169203331"
    assert continued.parent_span_id == "b7ad6b7169203331"


def test_nesting_follows_contextvars_across_await(hub, connect):
    t = connect("py-async")
    seen = {}

    async def request(name: str) -> None:
        with t.span("request", name=name) as outer:
            await asyncio.sleep(0.01)
            with t.span("step") as inner:
                await asyncio.sleep(0.01)
                seen[name] = (outer, inner)

    async def main() -> None:
        await asyncio.gather(*(request(f"r{i}") for i in range(5)))

    asyncio.run(main())
    traces = set()
    for outer, inner in seen.values():
        assert inner.trace_id == outer.trace_id
        assert inner.parent_span_id == outer.span_id
        traces.add(outer.trace_id)
    assert len(traces) == 5, "concurrent tasks do not share a span"
    assert tb._current.get() is None


def test_exception_path(hub, connect):
    tail = hub.tail("--worker", "py-errors")
    t = connect("py-errors")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with t.span("inference", model="m") as span:
            span.set(output_tokens=3)
            raise RuntimeError("CUDA out of memory")
    failed = tail.wait_named("inference.exception")[0]
    assert failed["metadata"]["result"] == "error"
    assert failed["metadata"]["error_type"] == "RuntimeError"
    assert failed["metadata"]["error_message"] == "CUDA out of memory"
    assert failed["measurements"]["output_tokens"] == 3
    assert tail.named("inference.stop") == []
    # A span that is dropped without ending is reported too.
    t.span("abandoned")
    assert tail.wait_named("abandoned.exception")[0]["metadata"]["error_type"] == "dropped"


def test_decorators_on_sync_and_async_functions(hub, connect):
    tail = hub.tail("--worker", "py-decorated")
    t = connect("py-decorated")

    @t.trace("embed")
    def embed(batch):
        return [len(x) for x in batch]

    @t.trace("embed.async", model="e5")
    async def embed_async(batch):
        await asyncio.sleep(0)
        return len(batch)

    @t.trace
    def plain():
        raise KeyError("missing")

    @t.trace_inference("gpt-4")
    def run_batch(inputs):
        with t.start_span("gpt-4-inner") as span:
            span.set_batch_size(len(inputs))
        return inputs

    assert embed(["ab", "c"]) == [2, 1]
    assert embed.__name__ == "embed"
    assert asyncio.run(embed_async([1, 2, 3])) == 3
    with pytest.raises(KeyError):
        plain()
    run_batch(["a", "b"])
    assert tail.wait_named("embed.stop")
    assert tail.wait_named("embed.async.stop")[0]["metadata"]["model"] == "e5"
    assert tail.wait_named("plain.exception")[0]["metadata"]["error_type"] == "KeyError"
    outer = tail.wait_named("inference.stop", 2)
    models = sorted(e["metadata"]["model"] for e in outer)
    assert models == ["gpt-4", "gpt-4-inner"]
    assert any(e["measurements"].get("batch_size") == 2 for e in outer)


def test_hub_killed_and_restarted_during_emission_loses_nothing(hub):
    # The worker reaches the hub through a forwarder, so that it reconnects to the restarted
    # hub only once a tail follows that hub: the tails then see every event between them.
    forwarder = Forwarder()
    forwarder.open(hub.addr)
    t = tb.connect(forwarder.url, worker_id="py-faults", linger=0.005)
    try:
        wait_connected(t)
        first = hub.tail("--worker", "py-faults", "load.>")
        total = 3000
        for i in range(total):
            t.emit("load.tick", measurements={"n": i})
            if i == 1000:
                forwarder.close()
                hub.kill()
            if i == 2000:
                hub.start()
                second = hub.tail("--worker", "py-faults", "load.>")
                forwarder.open(hub.addr)
            if i % 10 == 0:  # about 5,000 events/s: what a debug build's tail keeps up with
                time.sleep(0.002)
        stats = t.close(timeout=WAIT)
    finally:
        forwarder.stop()
    assert stats["confirmed"] == stats["accepted"] == total, stats
    assert stats["buffered"] == 0 and stats["dropped"] == 0, stats
    assert stats["replayed"] > 0, stats

    def missing():
        got = {e["measurements"]["n"] for e in first.named("load.tick")}
        got |= {e["measurements"]["n"] for e in second.named("load.tick")}
        return sorted(set(range(total)) - got)

    try:
        eventually("every event at one hub or the other", lambda: not missing(), timeout=10)
    except BaseException:
        notices = [e for e in first.events + second.events if e.get("type") != "event"]
        raise AssertionError(
            f"missing: {missing()[:20]} ({len(missing())}); stats {stats}; notices {notices[:3]}"
        )


def test_fork_child_gets_its_own_link(hub, connect):
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    tail = hub.tail("from.>", "child.>")
    t = connect("py-fork")
    wait_connected(t)
    t.emit("from.parent", metadata={"pid": str(os.getpid())})

    def child() -> int:
        pid = os.fork()
        if pid == 0:  # the child: emit, drain and leave without running pytest's teardown
            code = 1
            try:
                t.emit("from.child", metadata={"pid": str(os.getpid())})
                with t.span("child.work"):
                    pass
                stats = t.close(timeout=10)
                own_id = t.worker_id == f"py-fork.{os.getpid()}"
                code = 0 if stats["confirmed"] == 3 and own_id else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return pid

    # Two children of one parent, as a prefork server makes them.
    pids = [child(), child()]
    children = tail.wait_named("from.child", 2)
    assert sorted(e["worker_id"] for e in children) == sorted(f"py-fork.{p}" for p in pids)
    assert {e["metadata"]["pid"] for e in children} == {str(p) for p in pids}
    # Random ids are drawn afresh in each child (its generator is reseeded after the fork):
    # the two children's spans are not one trace.
    spans = tail.wait_named("child.work.start", 2)
    assert len({e["trace_id"] for e in spans}) == 2, spans
    # The parent's link goes on, unshared.
    t.emit("from.parent", metadata={"after": "fork"})
    parents = tail.wait_named("from.parent", 2)
    assert {e["worker_id"] for e in parents} == {"py-fork"}
    assert [e["sequence"] for e in parents] == [1, 2]
    assert t.stats()["confirmed"] >= 1
    pid = pids[0]
    workers = hub.cli("workers")
    assert f"py-fork.{pid}" in workers and "py-fork " in workers
    # A child that never uses the handle links nothing, even when it is closed at its exit.
    idle = os.fork()
    if idle == 0:
        code = 1
        try:
            stats = t.close(timeout=5)
            code = 0 if stats["produced"] == 0 and t.link_state == "closed" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(idle, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert f"py-fork.{idle}" not in hub.cli("workers")
    assert not t.closed, "the child's close is the child's"


def test_bad_input_raises_what_is_wrong(hub, connect):
    t = connect("py-bad")
    with pytest.raises(ValueError, match="empty token"):
        t.emit("inference..stop")
    with pytest.raises(ValueError, match="whitespace"):
        t.emit("bad name")
    with pytest.raises(ValueError, match="belong to the protocol"):
        t.emit("bridge.worker.stats")
    with pytest.raises(TypeError, match="measurement `tokens` is list"):
        t.emit("x.y", measurements={"tokens": [1, 2]})
    with pytest.raises(TypeError, match="measurement `v` is NoneType"):
        t.emit("x.y", measurements={"ok": 1, "v": None})
    with pytest.raises(TypeError, match="measurement keys must be str"):
        t.emit("x.y", measurements={1: 1})
    with pytest.raises(OverflowError, match="`big`"):
        t.emit("x.y", measurements={"big": 2**64})
    with pytest.raises(ValueError, match="invalid span operation"):
        t.span("two words")
    with pytest.raises(TypeError, match="measurement `x` is dict"):
        with t.span("ok") as span:
            span.set(x={})
    with pytest.raises(ValueError, match="http:// or https://"):
        tb.connect("hub:50051", worker_id="x")
    with pytest.raises(ValueError, match="label keys"):
        tb.connect(hub.url, worker_id="x", labels={"bad key": "v"})
    with pytest.raises(ValueError, match="timeout"):
        t.close(timeout=-1)
    assert t.stats()["produced"] == 2  # the span `ok`, started and ended by the exception
    assert not t.closed


def test_close_drains_and_a_down_hub_never_raises(hub, connect):
    tail = hub.tail("--worker", "py-drain", "drain.>")
    t = connect("py-drain", linger=0.05)
    for i in range(5000):
        t.emit("drain.item", measurements={"i": i})
    stats = t.close(timeout=WAIT)
    assert stats["confirmed"] == 5000 and stats["buffered"] == 0, stats
    tail.wait_named("drain.item", 5000)
    t.emit("drain.after_close")
    assert t.stats()["disabled"] == 1
    # A hub that is not there: connect does not raise, emit buffers, close gives up in time.
    hub.kill()
    down = connect("py-down")
    for _ in range(10):
        down.emit("lost.event")
    assert down.link_state.startswith(("connecting", "disconnected"))
    began = time.monotonic()
    stats = down.close(timeout=0.5)
    assert time.monotonic() - began < 5
    assert stats["buffered"] == 10 and stats["confirmed"] == 0, stats


def test_connect_defaults_from_the_environment(hub, monkeypatch):
    monkeypatch.setenv("BRIDGE_HUB", hub.url)
    monkeypatch.setenv("BRIDGE_WORKER_ID", "py-env")
    tail = hub.tail("--worker", "py-env")
    t = tb.connect()
    try:
        assert t.worker_id == "py-env"
        t.emit("env.ok")
        tail.wait_named("env.ok")
    finally:
        t.close(timeout=5)


def test_unix_socket_reaches_a_sidecars_local_endpoint(hub, tmp_path):
    from conftest import BIN_DIR

    sock = tmp_path / "worker.sock"
    sidecar = subprocess.Popen(
        [str(BIN_DIR / "worker"), "--hub", hub.url, "--id", "sidecar-1", "--local", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tail = hub.tail("--worker", "sidecar-1", "via.>")
        eventually("the sidecar's socket", sock.exists)
        t = tb.connect(f"unix://{sock}", worker_id="app-1", linger=0.0)
        with t.span("via.span") as span:
            t.emit("via.socket", measurements={"n": 1})
        stats = t.close(timeout=WAIT)
        assert stats["confirmed"] == stats["accepted"] == 3, stats
        arrived = tail.wait_named("via.socket")[0]
        assert arrived["measurements"] == {"n": 1}
        assert arrived["trace_id"] == span.trace_id
        assert tail.wait_named("via.span.stop")[0]["worker_id"] == "sidecar-1"
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=WAIT)
