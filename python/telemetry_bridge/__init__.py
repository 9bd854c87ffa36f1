"""Emit telemetry to a telemetry-bridge hub from Python.

The protocol (control, acknowledgements, consistent sampling, sequence numbers, the outage
buffer, receipts, reconnects) is the Rust worker library's, run on an I/O thread of its own;
Python threads only check, encode and buffer. See ``telemetry_bridge/__init__.pyi`` for the
typed API and docs/python.md for the guide.

    import telemetry_bridge as tb
    t = tb.connect("http://hub:50051", worker_id="gpu-3", pool="llama-70b")
    t.emit("cache.hit", measurements={"bytes": 4096}, metadata={"tier": "l2"})
    with t.span("inference", model="llama-70b") as span:
        span.set(output_tokens=512)
    t.close()
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import threading
from typing import Any, Callable, Mapping, Optional, TypeVar

from . import _native

__all__ = ["connect", "Telemetry", "Span", "Tracer"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The current span, per thread and per asyncio task (``contextvars``).
_current = _native.current_span

# A forked child must not use the parent's link: the first use there makes its own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_native.after_fork_in_child)

# Clients not yet closed, drained at exit. Strong references: a client dropped without close()
# still gets its buffer drained.
_open: set = set()
_open_lock = threading.Lock()


def _close_all() -> None:
    with _open_lock:
        clients = list(_open)
    for client in clients:
        try:
            client.close()
        except Exception:  # never let telemetry fail the exit
            pass


atexit.register(_close_all)


class Span(_native.Span):
    """A timed operation: ``OP.start`` when made, ``OP.stop`` or ``OP.exception`` when it ends.

    Use it as a context manager (``with`` or ``async with``); inside it, spans started and
    events emitted on this thread or task belong to it (``contextvars``).
    """

    def __enter__(self) -> "Span":
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        token = self.__dict__.pop("_token", None)
        if token is not None:
            try:
                _current.reset(token)
            except ValueError:  # entered in another context (e.g. a generator moved threads)
                _current.set(None)
        if exc_type is None:
            self.stop()
        else:
            self.exception(exc_type.__name__, str(exc))
        return False

    async def __aenter__(self) -> "Span":
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)

    # InferTrace's names.
    def set_tokens(
        self,
        input: Optional[int] = None,
        output: Optional[int] = None,
        cached: Optional[int] = None,
    ) -> None:
        """Records ``input_tokens``, ``output_tokens`` and ``cached_input_tokens``."""
        values = {}
        if input is not None:
            values["input_tokens"] = input
        if output is not None:
            values["output_tokens"] = output
        if cached is not None:
            values["cached_input_tokens"] = cached
        self.set(**values)

    def set_batch_size(self, size: int) -> None:
        """Records ``batch_size``."""
        self.set(batch_size=size)

    def __repr__(self) -> str:
        return f"<Span {self.operation} trace={self.trace_id} span={self.span_id}>"


class Telemetry(_native.Client):
    """A worker's link to the hub. Made by :func:`connect`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _open_lock:
            _open.add(self)

    def close(self, timeout: float = 5.0) -> dict:
        """Sends what is buffered, waits up to `timeout` seconds for the hub to confirm it (the
        GIL released), stops the link and returns the final stats(). Later emits are counted
        as disabled."""
        stats = super().close(timeout)
        with _open_lock:
            _open.discard(self)
        return stats

    def span(
        self,
        operation: str,
        metadata: Optional[Mapping[str, Any]] = None,
        *,
        correlation_id: Optional[str] = None,
        traceparent: Optional[str] = None,
        **attributes: Any,
    ) -> Span:
        """Starts a span (emits OPERATION.start); use it with `with`. Metadata from `metadata`
        and keyword arguments. Inside another span it is that span's child; with `traceparent`
        it continues the caller's trace; with `correlation_id` and no parent its trace id is
        derived from the id."""
        meta = dict(metadata) if metadata else {}
        meta.update(attributes)
        return Span(self, operation, meta, correlation_id, traceparent, _current.get())

    def trace(self, operation: Any = None, **attributes: Any) -> Any:
        """Decorates a function, sync or async, to run in a span named `operation` (default:
        the function's name), with `attributes` as metadata. `@t.trace` works bare too."""
        if callable(operation):  # bare @t.trace
            return self.trace(None)(operation)

        def decorate(fn: _F) -> _F:
            op = operation or fn.__name__
            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def traced_async(*args: Any, **kwargs: Any) -> Any:
                    with self.span(op, **attributes):
                        return await fn(*args, **kwargs)

                return traced_async  # type: ignore[return-value]

            @functools.wraps(fn)
            def traced(*args: Any, **kwargs: Any) -> Any:
                with self.span(op, **attributes):
                    return fn(*args, **kwargs)

            return traced  # type: ignore[return-value]

        return decorate

    # InferTrace's names.
    def start_span(self, model_name: str, **attributes: Any) -> Span:
        """InferTrace's Tracer.start_span: an `inference` span with `model`."""
        return self.span("inference", model=model_name, **attributes)

    def trace_inference(self, model: str, **attributes: Any) -> Callable[[_F], _F]:
        """InferTrace's @trace_inference: runs the function in an `inference` span."""
        return self.trace("inference", model=model, **attributes)

    def __repr__(self) -> str:
        return f"<Telemetry worker_id={self.worker_id!r} {self.link_state}>"


#: InferTrace's name for the handle.
Tracer = Telemetry


def _parse_labels(labels: Any) -> list:
    if labels is None:
        return []
    if isinstance(labels, Mapping):
        return [(str(k), str(v)) for k, v in labels.items()]
    return [(str(k), str(v)) for k, v in labels]


def connect(
    hub: Optional[str] = None,
    *,
    worker_id: Optional[str] = None,
    pool: str = "",
    labels: Optional[Mapping[str, str]] = None,
    token: Optional[str] = None,
    ca: Optional[str] = None,
    cert: Optional[str] = None,
    key: Optional[str] = None,
    buffer_events: Optional[int] = None,
    linger: Optional[float] = None,
) -> Telemetry:
    """Starts linking this process to a hub and returns its handle (see __init__.pyi).

    `hub` defaults to $BRIDGE_HUB, else http://127.0.0.1:50051 (unix:///PATH reaches a
    sidecar's local endpoint); `worker_id` to $BRIDGE_WORKER_ID, else HOSTNAME.PID; `pool`,
    `token`, `ca`, `cert`, `key` to $BRIDGE_POOL, $BRIDGE_TOKEN, $BRIDGE_CA, $BRIDGE_CERT,
    $BRIDGE_KEY. Raises ValueError for options that can never work; a hub that is down does
    not raise (the link retries, events wait in the buffer).
    """
    env = os.environ
    hub = hub or env.get("BRIDGE_HUB") or "http://127.0.0.1:50051"
    if worker_id is None:
        worker_id = env.get("BRIDGE_WORKER_ID") or f"{_host_name()}.{os.getpid()}"
    return Telemetry(
        hub,
        worker_id,
        pool=pool or env.get("BRIDGE_POOL", ""),
        labels=_parse_labels(labels),
        token=token if token is not None else env.get("BRIDGE_TOKEN"),
        ca=ca if ca is not None else env.get("BRIDGE_CA"),
        cert=cert if cert is not None else env.get("BRIDGE_CERT"),
        key=key if key is not None else env.get("BRIDGE_KEY"),
        buffer_events=buffer_events,
        linger=linger,
    )


def _host_name() -> str:
    import socket

    return socket.gethostname().split(".")[0] or "python"
