"""Emit telemetry to a telemetry-bridge hub from Python.

The protocol (control, acknowledgements, consistent sampling, sequence numbers, the outage
buffer, receipts, reconnects) is the Rust worker library's, running on an I/O thread of its
own. ``emit`` checks, encodes and buffers on the caller's thread and returns: it never waits on
the network, so it never blocks a thread or an asyncio event loop.
"""

from contextvars import ContextVar
from types import TracebackType
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple, TypeVar, Union, overload

_F = TypeVar("_F", bound=Callable[..., Any])

#: A measurement, as in the proto's ``TelemetryValue`` oneof. ``bool`` is an ``int`` (1 or 0);
#: objects with ``__index__`` (numpy's integers) are ints too.
Measurement = Union[int, float, str]

def connect(
    hub: Optional[str] = None,
    *,
    worker_id: Optional[str] = None,
    pool: str = "",
    labels: Optional[Union[Mapping[str, str], Iterable[Tuple[str, str]]]] = None,
    token: Optional[str] = None,
    ca: Optional[str] = None,
    cert: Optional[str] = None,
    key: Optional[str] = None,
    buffer_events: Optional[int] = None,
    linger: Optional[float] = None,
) -> Telemetry:
    """Starts linking this process to a hub and returns its handle.

    ``hub`` is an ``http://`` or ``https://`` URL, or ``unix:///PATH`` for a sidecar's local
    endpoint (``worker --local PATH``); default ``$BRIDGE_HUB``, else
    ``http://127.0.0.1:50051``. ``worker_id`` defaults to ``$BRIDGE_WORKER_ID``, else
    ``HOSTNAME.PID``; ``pool`` to ``$BRIDGE_POOL``. ``token``, ``ca``, ``cert`` and ``key``
    are the CLI's ``--token``/``--ca``/``--cert``/``--key`` (defaults ``$BRIDGE_TOKEN``,
    ``$BRIDGE_CA``, ``$BRIDGE_CERT``, ``$BRIDGE_KEY``). ``buffer_events`` bounds the outage
    buffer (when full the oldest event is dropped and counted); ``linger`` (seconds, default
    0.1) is how long events that follow a send closely wait to travel together.

    Raises ``ValueError`` (one line, the worker library's message) for options that can never
    work: a malformed URL, an unreadable certificate, a bad label key. A hub that is down does
    not raise: the link retries in the background and events wait in the buffer.
    """

class Span:
    """A timed operation, as ``Telemetry.span`` makes it: ``OP.start`` when made, then
    ``OP.stop`` (``result=success``) or ``OP.exception`` (``result=error``, ``error_type``,
    ``error_message``) with ``duration_ns`` and what was set on it.

    As a context manager (``with`` / ``async with``) it is the current span of its thread or
    asyncio task (``contextvars``): spans started inside are its children and events emitted
    inside carry its trace ids. An exception leaving the block ends it with ``.exception``
    (``error_type`` is the exception's class name) and propagates. A span never ended is
    reported as ``.exception`` with ``error_type=dropped`` when it is garbage-collected.
    """

    @property
    def operation(self) -> str: ...
    @property
    def trace_id(self) -> str:
        """32 lower-case hex digits."""
    @property
    def span_id(self) -> str:
        """16 lower-case hex digits."""
    @property
    def parent_span_id(self) -> Optional[str]: ...
    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` header for a call this span makes downstream."""
    @property
    def correlation_id(self) -> str:
        """The correlation id its events carry: the one given, else the parent's, else the
        trace id's hex."""
    @property
    def ended(self) -> bool: ...
    def set(self, **measurements: Measurement) -> None:
        """Records measurements for the event that ends the span (e.g. ``output_tokens=512``).
        ``duration_ns`` and ``system_time_ns`` are the span's own and cannot be set. Raises
        ``TypeError`` naming the key for a value that is not int, float or str."""
    def set_metadata(self, **metadata: Any) -> None:
        """Sets metadata for the event that ends the span; values are converted with ``str``."""
    def set_tokens(
        self, input: Optional[int] = None, output: Optional[int] = None, cached: Optional[int] = None
    ) -> None:
        """InferTrace's ``set_tokens``: ``input_tokens``, ``output_tokens``,
        ``cached_input_tokens``."""
    def set_batch_size(self, size: int) -> None:
        """InferTrace's ``set_batch_size``: ``batch_size``."""
    def event(
        self,
        name: str,
        measurements: Optional[Mapping[str, Measurement]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Emits an event within this span (its trace ids and correlation id)."""
    def stop(self) -> None:
        """Ends the span successfully; ending an ended span does nothing."""
    def exception(self, error_type: str, message: str = "") -> None:
        """Ends the span with an error."""
    def __enter__(self) -> Span: ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    async def __aenter__(self) -> Span: ...
    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class Telemetry:
    """A process's link to the hub; made by :func:`connect`. Safe to share between threads
    and asyncio tasks. After ``os.fork()`` the child's first use of it makes the child's own
    link (new instance, worker id ``WORKER_ID.CHILD_PID``); the parent's is never shared."""

    @property
    def worker_id(self) -> str:
        """The worker id this process reports as (``ID.PID`` in a forked child)."""
    @property
    def link_state(self) -> str:
        """``connecting``, ``connected``, ``disconnected: WHY`` or ``closed``."""
    @property
    def closed(self) -> bool: ...
    def emit(
        self,
        name: str,
        measurements: Optional[Mapping[str, Measurement]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        correlation_id: Optional[str] = None,
    ) -> None:
        """Emits one event named ``name`` (dotted, e.g. ``cache.hit``).

        Never blocks and never raises for telemetry reasons: an event that is disabled,
        filtered or sampled out, a full buffer, a lost hub, are counted (``stats()``). It
        raises only for a mistake in the call: ``ValueError`` for a malformed name (empty
        token, whitespace, wildcard) or one under ``bridge.``; ``TypeError`` naming the key
        for a measurement that is not int, float or str; ``OverflowError`` for an int beyond
        64 bits. Metadata values are converted with ``str``.

        Inside a span (and without ``correlation_id``) the event carries the span's trace ids
        and correlation id, and is sampled with it.
        """
    def span(
        self,
        operation: str,
        metadata: Optional[Mapping[str, Any]] = None,
        *,
        correlation_id: Optional[str] = None,
        traceparent: Optional[str] = None,
        **attributes: Any,
    ) -> Span:
        """Starts a span (emits ``OPERATION.start``); use it with ``with``.

        Metadata comes from ``metadata`` (the seed's positional dict) and keyword arguments
        (``model="llama-70b"``). Inside another span it is that span's child; with
        ``traceparent`` (an incoming W3C header) it continues the caller's trace (a malformed
        header starts a new one); with ``correlation_id`` and no parent, its trace id is
        derived from the id, so every process reporting that request lands in one trace.
        """
    @overload
    def trace(self, operation: _F) -> _F: ...
    @overload
    def trace(self, operation: Optional[str] = None, **attributes: Any) -> Callable[[_F], _F]: ...
    def trace(self, operation: Any = None, **attributes: Any) -> Any:
        """Decorates a function (sync or ``async``) to run in a span named ``operation``
        (default: the function's name), with ``attributes`` as metadata."""
    def start_span(self, model_name: str, **attributes: Any) -> Span:
        """InferTrace's ``Tracer.start_span``: an ``inference`` span with ``model``."""
    def trace_inference(self, model: str, **attributes: Any) -> Callable[[_F], _F]:
        """InferTrace's ``@trace_inference``: runs the function in an ``inference`` span."""
    def stats(self) -> dict[str, int]:
        """What became of every event: ``produced``, ``accepted``, ``sent``, ``replayed``,
        ``confirmed``, ``buffered``, ``sampled_out``, ``filtered``, ``disabled``, the
        ``dropped.*`` reasons and ``dropped`` (their sum)."""
    def close(self, timeout: float = 5.0) -> dict[str, int]:
        """Sends what is buffered, waits up to ``timeout`` seconds for the hub to confirm it
        (the GIL released), stops the link and returns the final ``stats()``. Later emits are
        counted as disabled. Registered with ``atexit`` for every handle not closed."""

#: InferTrace's name for the handle.
Tracer = Telemetry

_current: ContextVar[Optional[Span]]
