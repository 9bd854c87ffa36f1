"""A full participant of the contract in Python, talking to a sidecar's local endpoint.

It names no worker (the sidecar relays its events under its own id), declares that it applies
control state itself (x-bridge-control-ack: 1), applies each `ControlState` it receives, prints
it as one JSON line on stdout and acknowledges it with a `bridge.control.applied` event. It
sends an `app.request` event with a correlation id every few milliseconds, sampled by the rate
it was given, until stdin closes.

usage: PYTHONPATH=GENERATED_DIR local_client.py TARGET   (e.g. unix:/tmp/w.sock)
"""
import asyncio
import hashlib
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict
from telemetry.bridge.v1 import bridge_pb2 as pb2
from telemetry.bridge.v1 import bridge_pb2_grpc as pb2_grpc

MASK64 = (1 << 64) - 1


def keep(correlation_id, rate):
    """The contract's deterministic sampling: fmix64(fnv1a64(id)) >> 11, over 2^53, below rate."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = 0xCBF29CE484222325
    for byte in correlation_id.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK64
    h ^= h >> 33
    return (h >> 11) / float(1 << 53) < rate


async def main():
    state = {"rate": 1.0, "enabled": True, "version": 0}
    outbox = asyncio.Queue()

    async def events():
        while True:
            event = await outbox.get()
            if event is None:
                return
            yield event

    async def produce():
        i = 0
        while True:
            cid = f"py-{i}"
            if state["enabled"] and keep(cid, state["rate"]):
                # Says how it was decided, so that the hub's accounting is exact.
                await outbox.put(pb2.TelemetryEvent(
                    event_parts=["app", "request"],
                    correlation_id=cid,
                    sampling_rate=state["rate"] if state["rate"] < 1.0 else 0.0,
                    control_version=state["version"],
                ))
            i += 1
            await asyncio.sleep(0.003)

    # Over a unix socket grpcio sends the percent-encoded path as :authority, which the Rust
    # HTTP/2 stack rejects as malformed (hyperium/h2#487); name the authority explicitly.
    options = [("grpc.default_authority", "localhost")] if sys.argv[1].startswith("unix:") else []
    channel = grpc.aio.insecure_channel(sys.argv[1], options=options)
    stub = pb2_grpc.TelemetryBridgeStub(channel)
    producer = asyncio.create_task(produce())
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    call = stub.StreamTelemetry(events(), metadata=(("x-bridge-control-ack", "1"),))

    async def controls():
        async for control in call:
            if control.HasField("state"):
                state["rate"] = control.state.sampling_rate
                state["enabled"] = control.state.enabled
                state["version"] = control.state.version
                print(json.dumps(MessageToDict(control)), flush=True)
                applied = pb2.TelemetryEvent(event_parts=["bridge", "control", "applied"])
                applied.measurements["version"].int_value = control.state.version
                await outbox.put(applied)

    reader = asyncio.create_task(controls())
    await stdin_closed
    producer.cancel()
    await outbox.put(None)
    reader.cancel()
    await channel.close()


asyncio.run(main())
