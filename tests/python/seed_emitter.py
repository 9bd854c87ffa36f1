"""The telemetry-stream seed's Python emitter, run against a telemetry-bridge hub.

It is the seed design's `GrpcTelemetryEmitter` with only the imports changed: it sends no
metadata (no worker id, no acknowledgements) and handles `sampling` and `toggle` controls the
way the seed does. Every millisecond or so it emits an `inference.start` and an `inference.stop`
with the correlation id `py-N`, until stdin closes. On stdout it prints every control message it
receives as one JSON line, and every 50 rounds a line `{"stats": {"next": N, "emitted": {..},
"sent": {..}}}`: how many events of each name it emitted and how many passed its own sampling.

usage: PYTHONPATH=GENERATED_DIR seed_emitter.py HOST:PORT|unix:PATH
"""
import asyncio
import json
import random
import sys
import time

import grpc  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402
from telemetry.bridge.v1 import bridge_pb2 as pb2  # noqa: E402
from telemetry.bridge.v1 import bridge_pb2_grpc as pb2_grpc  # noqa: E402


class GrpcTelemetryEmitter:
    """Emits telemetry events via gRPC stream (from the seed design)."""

    def __init__(self, telemetry_stub):
        self.stub = telemetry_stub
        self.enabled = True
        self.sampling_rate = 1.0
        self.event_queue = asyncio.Queue(maxsize=1000)
        self.stream_task = None

    async def start_stream(self):
        self.stream_task = asyncio.create_task(self._stream_loop())

    async def _stream_loop(self):
        try:
            async def event_generator():
                while True:
                    event = await self.event_queue.get()
                    if event is None:
                        break
                    yield event

            async for control in self.stub.StreamTelemetry(event_generator()):
                self._handle_control(control)
        except Exception as e:  # never crash the worker due to telemetry
            print(f"Telemetry stream error: {e}", file=sys.stderr)

    def _handle_control(self, control):
        print(json.dumps(MessageToDict(control)), flush=True)
        if control.HasField("sampling"):
            self.sampling_rate = control.sampling.sampling_rate
        elif control.HasField("toggle"):
            self.enabled = control.toggle.enabled

    def emit(self, event_name, measurements, metadata=None, correlation_id=None):
        if not self.enabled:
            return
        if random.random() > self.sampling_rate:
            return
        event = pb2.TelemetryEvent(
            event_parts=event_name.split("."),
            timestamp_ns=time.time_ns(),
            correlation_id=correlation_id or "",
        )
        for key, value in (measurements or {}).items():
            if isinstance(value, int):
                event.measurements[key].int_value = value
            elif isinstance(value, float):
                event.measurements[key].float_value = value
            else:
                event.measurements[key].string_value = str(value)
        for key, value in (metadata or {}).items():
            event.metadata[key] = str(value)
        try:
            self.event_queue.put_nowait(event)
        except asyncio.QueueFull:
            pass


async def main():
    # Over a unix socket grpcio sends the socket path as :authority unless told otherwise.
    options = [("grpc.default_authority", "localhost")] if sys.argv[1].startswith("unix:") else []
    channel = grpc.aio.insecure_channel(sys.argv[1], options=options)
    emitter = GrpcTelemetryEmitter(pb2_grpc.TelemetryBridgeStub(channel))
    await emitter.start_stream()
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    # What the app asked to emit and what the emitter queued for sending, by event name: the
    # emitter samples in emit(), so the difference is what it dropped at the source.
    emitted = {"inference.start": 0, "inference.stop": 0}
    sent = dict(emitted)
    i = 0
    while not stdin_closed.done():
        for name in emitted:
            queued = emitter.event_queue.qsize()
            emitter.emit(
                name,
                {"tokens": 100 + i % 50, "latency_ms": 12.5, "device": "cuda:0"},
                {"model": "seed-model"},
                correlation_id=f"py-{i}",
            )
            emitted[name] += 1
            sent[name] += emitter.event_queue.qsize() - queued
        i += 1
        if i % 50 == 0:
            print(json.dumps({"stats": {"next": i, "emitted": emitted, "sent": sent}}), flush=True)
        await asyncio.sleep(0.001)
    await emitter.event_queue.put(None)
    await channel.close()


if __name__ == "__main__":  # importable: python/bench/emit_bench.py times its emit
    asyncio.run(main())
