"""W3C Trace Context (`traceparent`) across gateway -> encoder -> Triton -> decoder, for the logs.

Every service logs the trace id, the turn and a hashed session id of the request it serves, so one
turn's lines can be found in every service's log with one search. No tracing library: the header is
55 characters of one fixed format (https://www.w3.org/TR/trace-context/), and nothing here exports
spans (OTLP export is left to a collector that reads the logs).

The turn's trace travels as gRPC metadata (`traceparent`, `vita-session`, `vita-turn`) to the encoder
and decoder, and as request parameters of the same names to Triton. A server reads it in
`TraceInterceptor` (every server of `common/grpc_server.py` has one): the RPC's task gets it as the
current trace and its log lines get trace_id, span_id, session and turn.

The session id is never logged raw: `session_hash` is the first 12 hex digits of its SHA-256. Session
ids are uuid4 (122 random bits), so the hash cannot be reversed by guessing and needs no salt, and
every service computes the same one without sharing a secret.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, replace

import grpc
import structlog

TRACEPARENT = "traceparent"
SESSION_KEY = "vita-session"   # hashed session id (session_hash), never the raw id
TURN_KEY = "vita-turn"

_HEADER = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_HASH = re.compile(r"[0-9a-f]{12}")
MAX_TURN = 1 << 31


class TraceParseError(ValueError):
    """A traceparent header that the W3C rules refuse; the message says which part."""


@dataclass(frozen=True)
class TraceParent:
    """One traceparent: a 32-hex trace id, the 16-hex id of the span that sent it, the flags."""

    trace_id: str
    span_id: str
    flags: int = 0x01  # sampled

    @classmethod
    def parse(cls, header: str) -> "TraceParent":
        """Per the W3C rules (lower-case hex only): version ff is invalid; version 00 has exactly
        four fields; a later version may append fields after a dash, which are ignored; trace id and
        parent id must not be all zeros. TraceParseError otherwise."""
        if not isinstance(header, str):
            raise TraceParseError(f"traceparent must be text, got {type(header).__name__}")
        m = _HEADER.fullmatch(header.strip())
        if m is None:
            raise TraceParseError(f"traceparent {header[:80]!r} is not version-traceid-parentid-flags in lower-case hex")
        version, trace_id, span_id, flags, rest = m.groups()
        if version == "ff":
            raise TraceParseError("traceparent version ff is invalid")
        if version == "00" and rest is not None:
            raise TraceParseError("traceparent version 00 has exactly four fields")
        if trace_id == "0" * 32:
            raise TraceParseError("traceparent trace-id is all zeros")
        if span_id == "0" * 16:
            raise TraceParseError("traceparent parent-id is all zeros")
        return cls(trace_id, span_id, int(flags, 16))

    @classmethod
    def new(cls) -> "TraceParent":
        """The root of a new trace."""
        return cls(_nonzero_hex(16), _nonzero_hex(8))

    def child(self) -> "TraceParent":
        """The same trace, a new span (what a service sends on to the next hop)."""
        return replace(self, span_id=_nonzero_hex(8))

    def header(self) -> str:
        """Always written as version 00 (a later version's extra fields are not ours to pass on)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags & 0xff:02x}"


def _nonzero_hex(nbytes: int) -> str:
    while True:
        value = secrets.token_hex(nbytes)
        if value.strip("0"):
            return value


def session_hash(session_id: str) -> str:
    """What the logs and the other services see of a session id: 12 hex digits of its SHA-256."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:12] if session_id else ""


@dataclass(frozen=True)
class Trace:
    """The trace of what a task serves: its span, and the turn and hashed session it belongs to."""

    parent: TraceParent
    session: str = ""      # session_hash(...), or "" (Synthesize, Transcribe)
    turn: int = 0          # 0: not a turn of a call
    from_caller: bool = False  # the trace id came from the caller (a turn continues it)

    def fields(self) -> dict:
        """The log fields of this trace."""
        out = {"trace_id": self.parent.trace_id, "span_id": self.parent.span_id}
        if self.session:
            out["session"] = self.session
        if self.turn:
            out["turn"] = self.turn
        return out

    def outgoing(self) -> dict[str, str]:
        """What goes to the next hop: a child span of ours, the session hash and the turn."""
        out = {TRACEPARENT: self.parent.child().header()}
        if self.session:
            out[SESSION_KEY] = self.session
        if self.turn:
            out[TURN_KEY] = str(self.turn)
        return out

    @classmethod
    def incoming(cls, items: Iterable[tuple[str, str | bytes]]) -> "Trace":
        """The trace a request arrived with (gRPC metadata or Triton parameters): the caller's trace
        continued with a span of our own, or a new trace when it sent none or a malformed one (the
        W3C rule: restart, never fail the request). A bad session or turn value is dropped."""
        values = {k.lower(): v for k, v in items if isinstance(v, str)}
        parent, from_caller = TraceParent.new(), False
        if TRACEPARENT in values:
            try:
                parent, from_caller = TraceParent.parse(values[TRACEPARENT]).child(), True
            except TraceParseError:
                pass
        session = values.get(SESSION_KEY, "")
        turn = values.get(TURN_KEY, "")
        return cls(parent, session if _HASH.fullmatch(session) else "",
                   int(turn) if turn.isdigit() and 0 < int(turn) < MAX_TURN else 0, from_caller)

    def for_turn(self, session_id: str, turn: int) -> "Trace":
        """A turn of a call on the gateway: the caller's trace if it sent one, else a new trace per turn."""
        parent = self.parent.child() if self.from_caller else TraceParent.new()
        return Trace(parent, session_hash(session_id), turn, self.from_caller)


_current: ContextVar[Trace | None] = ContextVar("vita_trace", default=None)


def current() -> Trace | None:
    return _current.get()


def use(trace: Trace) -> Trace:
    """Make `trace` the current one of this task (and of the tasks it starts) and of its log lines."""
    _current.set(trace)
    structlog.contextvars.bind_contextvars(**trace.fields())
    return trace


def start_turn(session_id: str, turn: int) -> Trace:
    """The gateway, at the start of a turn: the trace of its hops (see Trace.for_turn)."""
    base = current() or Trace(TraceParent.new())
    return use(base.for_turn(session_id, turn))


def grpc_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a gRPC call to the next hop: the current trace's (none outside a trace)."""
    trace = current()
    return tuple(trace.outgoing().items()) if trace else ()


def triton_parameters() -> dict[str, str]:
    """Request parameters for Triton: the same keys and values as the gRPC metadata."""
    trace = current()
    return trace.outgoing() if trace else {}


class TraceInterceptor(grpc.aio.ServerInterceptor):
    """Reads the trace of every incoming RPC before its handler runs. gRPC runs the interceptors and
    then the handler in one task per RPC, so what `use` sets here is that RPC's alone."""

    async def intercept_service(self, continuation, handler_call_details):
        metadata = handler_call_details.invocation_metadata or ()
        use(Trace.incoming((item.key, item.value) if hasattr(item, "key") else item for item in metadata))
        return await continuation(handler_call_details)
