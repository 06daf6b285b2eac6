"""Item 10: one turn's W3C trace across gateway -> encoder -> Triton -> decoder, in every service's log,
with the turn and a hashed session id (never the raw one). The parser's rules are unit tests; the
propagation runs on real servers (the in-process cluster, real Triton, real Redis)."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import pytest
import structlog

from vitaserve.common import tracing
from vitaserve.common.logs import hide_session_ids, shared_processors
from vitaserve.common.tracing import Trace, TraceParent, TraceParseError, session_hash

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# ---- the parser (W3C Trace Context, level 1) ---------------------------------------------------------
def test_a_valid_header_round_trips():
    parent = TraceParent.parse(VALID)
    assert (parent.trace_id, parent.span_id, parent.flags) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)
    assert parent.header() == VALID
    assert TraceParent.parse(VALID.replace("-01", "-00")).flags == 0


@pytest.mark.parametrize("header, why", [
    ("", "not version"),
    (VALID.upper(), "lower-case"),                                        # upper-case hex is invalid
    ("ff" + VALID[2:], "version ff"),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "trace-id is all zeros"),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "parent-id is all zeros"),
    (VALID + "-extra", "exactly four fields"),                           # version 00 has no more fields
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", "not version"),   # 31-hex trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01", "not version"),   # 15-hex parent id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1", "not version"),   # one-digit flags
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01", "not version"),  # not hex
    ("0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "not version"),
    ("00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", "not version"),
])
def test_invalid_headers_are_refused_with_the_reason(header, why):
    with pytest.raises(TraceParseError, match=why):
        TraceParent.parse(header)


def test_a_later_version_may_append_fields_and_is_answered_as_version_00():
    parent = TraceParent.parse("cc" + VALID[2:] + "-what-the-future-adds")
    assert parent.header() == VALID


def test_new_and_child_ids():
    roots = {TraceParent.new() for _ in range(200)}
    assert len({r.trace_id for r in roots}) == 200 and len({r.span_id for r in roots}) == 200
    for root in roots:
        assert TraceParent.parse(root.header()) == root  # never all zeros, always well-formed
    parent = TraceParent.parse(VALID)
    child = parent.child()
    assert child.trace_id == parent.trace_id and child.span_id != parent.span_id and child.flags == parent.flags


def test_incoming_continues_a_valid_trace_and_restarts_on_a_bad_one():
    sid = "0123456789abcdef0123456789abcdef"
    got = Trace.incoming([("traceparent", VALID), ("vita-session", session_hash(sid)), ("vita-turn", "7")])
    assert got.parent.trace_id == TraceParent.parse(VALID).trace_id and got.from_caller
    assert got.parent.span_id != TraceParent.parse(VALID).span_id  # a span of the receiver's own
    assert (got.session, got.turn) == (session_hash(sid), 7)
    bad = Trace.incoming([("traceparent", VALID.upper()), ("vita-session", sid), ("vita-turn", "-1"),
                          ("vita-turn-bin", b"\x00")])
    assert not bad.from_caller and bad.parent.trace_id != got.parent.trace_id
    assert (bad.session, bad.turn) == ("", 0)  # a raw session id or a bad turn is dropped, not logged
    turn = got.for_turn(sid, 3)  # a caller's trace is continued by every turn
    assert turn.parent.trace_id == got.parent.trace_id and (turn.session, turn.turn) == (session_hash(sid), 3)
    assert Trace.incoming([]).for_turn(sid, 1).parent.trace_id != Trace.incoming([]).for_turn(sid, 1).parent.trace_id


def test_outgoing_carries_a_child_span_the_session_hash_and_the_turn():
    trace = Trace(TraceParent.parse(VALID), session_hash("s"), 4)
    out = trace.outgoing()
    sent = TraceParent.parse(out["traceparent"])
    assert sent.trace_id == trace.parent.trace_id and sent.span_id != trace.parent.span_id
    assert out["vita-session"] == session_hash("s") and out["vita-turn"] == "4"
    back = Trace.incoming(out.items())
    assert (back.parent.trace_id, back.session, back.turn) == (trace.parent.trace_id, trace.session, 4)


def test_no_log_line_holds_a_raw_session_id():
    sid = "0123456789abcdef0123456789abcdef"
    event = hide_session_ids(None, "info", {"event": "x", "session_id": sid, "stream_id": f"{sid}:3:ab"})
    assert sid not in json.dumps(event) and event["session"] == session_hash(sid) == hashlib_prefix(sid)
    # an error's text naming a session (a resume refused, a store failure) is hidden too; trace ids stay
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    event = hide_session_ids(None, "warning", {"event": f"turn failed in {sid}", "trace_id": trace_id,
                                               "error": f"SessionNotFound('session {sid}: not found')"})
    assert sid not in json.dumps(event) and session_hash(sid) in event["error"] and session_hash(sid) in event["event"]
    assert event["trace_id"] == trace_id


def hashlib_prefix(sid: str) -> str:
    import hashlib

    return hashlib.sha256(sid.encode()).hexdigest()[:12]


def test_the_generator_contract_reads_the_trace_from_request_parameters():
    from vitaserve.generator.contract import request_trace

    got = request_trace(json.dumps({"traceparent": VALID, "vita-turn": "2", "vita-session": "abcdef012345"}))
    assert got.parent.trace_id == TraceParent.parse(VALID).trace_id and got.turn == 2
    assert not request_trace("not json").from_caller and not request_trace("").from_caller


# ---- across real services ------------------------------------------------------------------------------
class Captured:
    """structlog's processors as the services configure them, ending in a list instead of a renderer."""

    def __init__(self):
        self.events: list[dict] = []

    def __call__(self, _, __, event: dict):
        self.events.append(dict(event))
        raise structlog.DropEvent

    def __enter__(self):
        structlog.configure(processors=[*shared_processors(), self], cache_logger_on_first_use=False)
        return self

    def __exit__(self, *exc):
        structlog.reset_defaults()


async def one_turn(target: str, samples, metadata=()) -> list:
    """A push-to-talk turn (the utterance, END_OF_UTTERANCE), then HANG_UP; the server's messages."""
    from test_gateway_e2e import audio_msg, config

    from vitaserve.api import conversation_pb2 as pb, conversation_pb2_grpc
    from vitaserve.gateway.codecs import encode_audio

    answered = asyncio.Event()

    async def requests():
        yield config(push_to_talk=True)
        for i in range(0, len(samples), 1600):
            yield audio_msg(encode_audio(samples[i:i + 1600], "mulaw", 8000))
        yield pb.ConverseRequest(control=pb.Control(action=pb.Control.END_OF_UTTERANCE))
        await asyncio.wait_for(answered.wait(), 60)
        yield pb.ConverseRequest(control=pb.Control(action=pb.Control.HANG_UP))

    got = []
    async with grpc.aio.insecure_channel(target) as channel:
        async for message in conversation_pb2_grpc.ConversationStub(channel).Converse(requests(), metadata=metadata):
            got.append(message)
            if message.WhichOneof("message") in ("turn_finished", "error"):
                answered.set()
    return got


def _lines_with(events: list[dict], trace_id: str, event: str) -> list[dict]:
    return [e for e in events if e.get("trace_id") == trace_id and e.get("event") == event]


def test_one_turns_trace_id_is_in_the_encoder_triton_and_decoder_logs(cluster, triton, utterance):
    """The caller sends a traceparent; its trace id, the turn and the hashed session id appear in the
    encoder's line for the turn, in the Triton model's lines (its log file) and in the decoder's line
    for each block; the raw session id appears in no log line."""
    caller = TraceParent.new()
    triton_log_start = triton["log"].stat().st_size
    with Captured() as logs:
        messages = asyncio.run(one_turn(cluster.gateway(0), utterance[:8000], ((tracing.TRACEPARENT, caller.header()),)))
    kinds = [m.WhichOneof("message") for m in messages]
    assert "turn_finished" in kinds, messages[-3:]
    session_id = messages[0].session_started.session_id
    want = {"session": session_hash(session_id), "turn": 1}

    trace_id = caller.trace_id
    (encoded,) = _lines_with(logs.events, trace_id, "encoded")
    decoded = _lines_with(logs.events, trace_id, "block decoded")
    assert decoded and {e["seq"] for e in decoded} == set(range(len(decoded)))
    for line in (encoded, *decoded):
        assert {k: line.get(k) for k in want} == want, line
        assert line["span_id"] != caller.span_id  # each hop logs a span of its own

    triton_lines = []
    for raw in triton["log"].read_bytes()[triton_log_start:].decode(errors="replace").splitlines():
        if raw.startswith("{") and trace_id in raw:
            triton_lines.append(json.loads(raw))
    events = {line["event"] for line in triton_lines}
    assert {"generation started", "generation finished"} <= events, triton_lines
    for line in triton_lines:
        assert {k: line.get(k) for k in want} == want and line["service"] == "generator", line

    everything = json.dumps(logs.events, default=str) + triton["log"].read_text(errors="replace")
    assert session_id not in everything


def test_a_turn_without_a_caller_trace_gets_a_new_trace_per_turn(cluster, utterance):
    with Captured() as logs:
        messages = asyncio.run(one_turn(cluster.gateway(1), utterance[:8000]))
    assert "turn_finished" in [m.WhichOneof("message") for m in messages]
    session = session_hash(messages[0].session_started.session_id)
    encoded = [e for e in logs.events if e.get("event") == "encoded" and e.get("session") == session]
    (line,) = encoded
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]) and line["turn"] == 1
    assert [e for e in logs.events if e.get("event") == "block decoded" and e.get("trace_id") == line["trace_id"]]
