"""The OpenAI Realtime mapping (gateway/adapters/realtime.py) on its own: no servers, no sockets."""

from __future__ import annotations

import base64
import json

import pytest
from websockets.datastructures import Headers

from vitaserve.api import audio_pb2, conversation_pb2 as pb
from vitaserve.gateway.adapters import realtime as rt


def test_schema_and_credentials_come_from_the_upgrade_as_the_sdk_sends_them():
    assert rt.schema_of(Headers({"OpenAI-Beta": "realtime=v1"})) == rt.BETA
    assert rt.schema_of(Headers({})) == rt.GA
    assert rt.credentials_of(Headers({"Authorization": "Bearer vk_live_abc"})) == (("x-api-key", "vk_live_abc"),)
    jwt = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    assert rt.credentials_of(Headers({"Authorization": jwt})) == (("authorization", jwt),)


def test_ga_session_update_becomes_the_call_config():
    s = rt.SessionSettings()
    s.update({"type": "realtime", "instructions": "Be brief.", "max_output_tokens": 80, "audio": {
        "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad", "threshold": 0.6,
                                                                        "silence_duration_ms": 700}},
        "output": {"format": {"type": "audio/pcm", "rate": 24000}}}}, rt.GA)
    config = s.call_config(mode="boost").config
    assert config.input_format == audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_MULAW, sample_rate=8000)
    assert config.output_format == audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_PCM16, sample_rate=24000)
    assert (config.system_prompt, config.max_new_tokens, config.mode, config.push_to_talk) == ("Be brief.", 80,
                                                                                               "boost", False)
    assert config.vad.threshold == pytest.approx(0.6) and config.vad.min_silence_ms == 700
    s.update({"type": "realtime", "audio": {"input": {"turn_detection": None}}}, rt.GA)
    assert s.call_config().config.push_to_talk and s.as_session(rt.GA, "sess_x", "m")["audio"]["input"][
        "turn_detection"] is None


def test_beta_session_update_uses_the_beta_names():
    s = rt.SessionSettings()
    s.update({"input_audio_format": "g711_alaw", "output_audio_format": "g711_ulaw", "turn_detection": None,
              "max_response_output_tokens": "inf"}, rt.BETA)
    config = s.call_config().config
    assert config.input_format.codec == audio_pb2.AUDIO_CODEC_ALAW
    assert config.output_format.codec == audio_pb2.AUDIO_CODEC_MULAW
    assert config.push_to_talk and config.max_new_tokens == 0
    assert s.as_session(rt.BETA, "sess_x", "m")["input_audio_format"] == "g711_alaw"


@pytest.mark.parametrize("session, param", [
    ({"type": "transcription"}, "session.type"),
    ({"audio": {"input": {"format": {"type": "audio/opus"}}}}, "session.audio.input.format"),
    ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "session.audio.output.format.rate"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 5}}}},
     "session.audio.input.turn_detection.silence_duration_ms"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "create_response": False}}}},
     "session.audio.input.turn_detection.create_response"),
    ({"max_output_tokens": 0}, "session.max_output_tokens"),
    ({"instructions": 7}, "session.instructions"),
])
def test_a_bad_session_update_names_its_field_and_changes_nothing(session, param):
    s = rt.SessionSettings()
    before = s.call_config()
    with pytest.raises(rt.RealtimeError) as info:
        s.update({"type": "realtime", **session}, rt.GA, "evt_1")
    assert info.value.param == param and info.value.event_id == "evt_1"
    assert rt.error_event(info.value)["error"]["type"] == "invalid_request_error"
    assert s.call_config() == before


def test_parse_event_refuses_what_is_not_a_client_event():
    for data, code in (("{x", "invalid_json"), (b"\x00", "invalid_event"), ("[]", "invalid_event"),
                       ('{"type": "nope"}', "invalid_event"),
                       ('{"type": "conversation.item.create"}', "unsupported_event")):
        with pytest.raises(rt.RealtimeError) as info:
            rt.parse_event(data)
        assert info.value.code == code
    with pytest.raises(rt.RealtimeError):
        rt.appended_audio({"audio": base64.b64encode(b"\0\0\0").decode()}, rt.PCM_24K)  # half a sample


def _answer(translator: rt.Translator, turn: int, chunks: list[float]) -> list[dict]:
    events = []
    for seq, duration in enumerate(chunks):
        events += translator.events(pb.ConverseResponse(text=pb.TextDelta(turn=turn, text=f"w{seq} ")))
        events += translator.events(pb.ConverseResponse(audio=pb.AudioChunk(turn=turn, seq=seq, data=b"\0\0",
                                                                            duration_s=duration)))
    return events


def test_a_turn_becomes_one_response_with_one_item_and_usage():
    t = rt.Translator(rt.GA)
    t.events(pb.ConverseResponse(session_started=pb.SessionStarted(session_id="abc")))
    t.events(pb.ConverseResponse(speech_started=pb.SpeechStarted(turn=1, at_s=0.5)))
    heard = t.events(pb.ConverseResponse(speech_ended=pb.SpeechEnded(turn=1, at_s=2.5, duration_s=2.0)))
    assert [e["type"] for e in heard] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                          "conversation.item.added", "conversation.item.done"]
    events = _answer(t, 1, [0.4, 0.4])
    events += t.events(pb.ConverseResponse(turn_finished=pb.TurnFinished(turn=1, text_tokens=3, audio_tokens=10)))
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.output_item.added", "conversation.item.added"]
    assert kinds.count("response.output_audio.delta") == 2 and kinds[-1] == "response.done"
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["conversation_id"] == "abc"
    assert done["usage"]["output_tokens"] == 13 and done["usage"]["input_tokens"] == 25  # 2 s at 12.5/s
    assert done["output"][0]["content"][0]["transcript"] == "w0 w1 "
    json.dumps(events)  # all of it goes on the wire


def test_a_beta_turn_uses_the_beta_event_names():
    """The end-to-end beta test cannot count on text in a sampled answer of the tiny model: the names
    of every answer event are checked here."""
    t = rt.Translator(rt.BETA)
    t.events(pb.ConverseResponse(session_started=pb.SessionStarted(session_id="abc")))
    t.events(pb.ConverseResponse(speech_started=pb.SpeechStarted(turn=1, at_s=0.5)))
    heard = t.events(pb.ConverseResponse(speech_ended=pb.SpeechEnded(turn=1, at_s=2.5, duration_s=2.0)))
    events = heard + _answer(t, 1, [0.4, 0.4])
    events += t.events(pb.ConverseResponse(turn_finished=pb.TurnFinished(turn=1, text_tokens=3, audio_tokens=10)))
    kinds = [e["type"] for e in events]
    assert kinds.count("response.audio_transcript.delta") == 2 and kinds.count("response.audio.delta") == 2
    assert {"conversation.item.created", "response.audio_transcript.done", "response.audio.done"} <= set(kinds)
    assert not [k for k in kinds if k.startswith("response.output_audio") or k == "conversation.item.added"]
    assert events[-1]["response"]["output"][0]["content"][0]["type"] == "audio"


def test_truncate_targets_the_items_audio():
    t = rt.Translator(rt.BETA)
    events = _answer(t, 1, [0.4, 0.4, 0.4])
    item_id = t.responses[1].item_id
    assert {e["type"] for e in events} >= {"response.audio.delta", "conversation.item.created"}
    response, seq, played = t.truncate_target(item_id, 500, None)
    assert (response.turn, seq, played) == (1, 1, 0.5)
    with pytest.raises(rt.RealtimeError, match="past"):
        t.truncate_target(item_id, 1300, None)
    with pytest.raises(rt.RealtimeError) as info:
        t.truncate_target("item_other", 10, None)
    assert info.value.code == "item_not_found"
    cancelled = t.events(pb.ConverseResponse(interrupted=pb.Interrupted(turn=1, audio_chunks_sent=3, audio_sent_s=1.2)))
    assert cancelled[-1]["response"]["status"] == "cancelled"
    assert t.events(pb.ConverseResponse(interrupted=pb.Interrupted(turn=1))) == []  # once


def test_a_cancel_says_who_cancelled_and_a_failed_request_is_forgotten():
    t = rt.Translator(rt.GA)
    t.events(pb.ConverseResponse(speech_ended=pb.SpeechEnded(turn=1, at_s=2.0, duration_s=1.0)))
    assert t.requested  # the call answers each utterance its VAD ends: cancellable before it begins
    _answer(t, 1, [0.4])
    assert t.active is not None and not t.requested
    t.cancelling = True  # the adapter sent the client's response.cancel
    done = t.events(pb.ConverseResponse(interrupted=pb.Interrupted(turn=1, audio_chunks_sent=1, audio_sent_s=0.4)))
    assert done[-1]["response"]["status_details"]["reason"] == "client_cancelled" and t.active is None
    t.events(pb.ConverseResponse(speech_ended=pb.SpeechEnded(turn=2, at_s=5.0, duration_s=1.0)))
    failed = t.events(pb.ConverseResponse(error=pb.Error(code=14, message="decoder down", turn=2)))
    assert failed[0]["error"]["type"] == "server_error" and not t.requested


class _Request:
    path = "/v1/realtime?model=vita-audio&mode=boost"
    headers = Headers({"Authorization": "Bearer vk_live_abc"})


class _Settings:
    max_frame_bytes, max_utterance_s, max_reader_stall_s = 64 * 1024, 8.0, 30.0


def _connection():
    """An adapter connection around no socket: what it sends is kept, what it yields is returned."""
    from types import SimpleNamespace

    from vitaserve.gateway.adapters.realtime_server import Connection

    conn = Connection(SimpleNamespace(settings=_Settings()), SimpleNamespace(request=_Request()))
    conn.sent = []

    async def send(event):
        conn.sent.append(event)
    conn._send = send
    return conn


def _run(conn, kind: str, event: dict) -> list[pb.ConverseRequest]:
    import asyncio

    async def collect():
        return [r async for r in conn._on_event(kind, event, None)]
    return asyncio.run(collect())


def test_truncate_of_the_answer_being_generated_reports_playback_then_cancels():
    conn = _connection()
    assert (conn.mode, conn.credentials) == ("boost", (("x-api-key", "vk_live_abc"),))
    _answer(conn.translator, 1, [0.4, 0.4, 0.4])
    item_id = conn.translator.responses[1].item_id
    out = _run(conn, "conversation.item.truncate", {"item_id": item_id, "content_index": 0, "audio_end_ms": 600})
    assert [r.WhichOneof("message") for r in out] == ["playback", "control"]
    assert (out[0].playback.turn, out[0].playback.seq, out[0].playback.played_s) == (1, 1, 0.6)
    assert out[1].control.action == pb.Control.CANCEL
    assert conn.sent[-1]["type"] == "conversation.item.truncated" and conn.sent[-1]["audio_end_ms"] == 600


def test_push_to_talk_keeps_the_buffer_until_response_create():
    conn = _connection()
    _run(conn, "session.update", {"session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}})
    second = base64.b64encode(b"\1\0" * 4800).decode()  # 0.1 s of 24 kHz PCM
    assert _run(conn, "input_audio_buffer.append", {"audio": second}) == []
    _run(conn, "input_audio_buffer.clear", {})
    assert conn.buffer == [] and conn.sent[-1]["type"] == "input_audio_buffer.cleared"
    _run(conn, "input_audio_buffer.append", {"audio": second})
    assert _run(conn, "input_audio_buffer.commit", {}) == []
    assert [e["type"] for e in conn.sent[-3:]] == ["input_audio_buffer.committed", "conversation.item.added",
                                                   "conversation.item.done"]
    out = _run(conn, "response.create", {})
    assert [r.WhichOneof("message") for r in out] == ["audio", "control"] and len(out[0].audio.data) == 9600
    assert out[1].control.action == pb.Control.END_OF_UTTERANCE
    with pytest.raises(rt.RealtimeError) as info:  # one response at a time
        _run(conn, "response.create", {})
    assert info.value.code == "conversation_already_has_active_response"
