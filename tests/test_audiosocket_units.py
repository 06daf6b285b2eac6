"""AudioSocket framing and pacing (gateway/adapters/audiosocket.py) without sockets: the frame parser
over every way the bytes can be split, every frame it refuses, and the Pacer's real-time release,
its barge-in bound and the playback it reports, on a clock the test drives."""

from __future__ import annotations

import struct
import uuid

import grpc
import pytest

from vitaserve.api import conversation_pb2 as pb
from vitaserve.gateway.adapters import audiosocket as wire
from vitaserve.gateway.adapters.audiosocket import AudioSocketError, FrameParser, Pacer

UUID = uuid.UUID("40325ec2-5efd-4bd3-805f-53576e581d13")


def stream() -> bytes:
    return (wire.frame(wire.KIND_UUID, UUID.bytes) + wire.frame(wire.KIND_AUDIO, bytes(320))
            + wire.frame(wire.KIND_DTMF, b"5") + wire.frame(wire.KIND_AUDIO, b"\x01\x02" * 80)
            + wire.frame(wire.KIND_HANGUP))


def test_frames_come_out_whole_however_the_bytes_are_split():
    data = stream()
    whole = FrameParser().feed(data)
    assert [f.kind for f in whole] == [0x01, 0x10, 0x03, 0x10, 0x00]
    assert whole[0].payload == UUID.bytes and len(whole[1].payload) == 320 and whole[2].payload == b"5"
    for step in (1, 2, 3, 7, 100):
        parser, got = FrameParser(), []
        for i in range(0, len(data), step):
            got += parser.feed(data[i:i + step])
        assert got == whole and not parser.partial


def test_partial_frame_is_known():
    parser = FrameParser()
    assert parser.feed(wire.frame(wire.KIND_AUDIO, bytes(320))[:100]) == [] and parser.partial


def test_the_uuid_is_the_session_id_form():
    sid = wire.session_id(UUID.bytes)
    assert sid == "40325ec25efd4bd3805f53576e581d13"
    from vitaserve.common.keys import check_session_id
    assert check_session_id(sid) == sid


BAD_HEADERS = [  # (bytes, words of the error)
    (struct.pack(">BH", 0x02, 6) + bytes(6), "unknown frame kind 0x02"),
    (struct.pack(">BH", 0x42, 0), "unknown frame kind 0x42"),
    (struct.pack(">BH", 0x12, 640), "above 8 kHz"),
    (struct.pack(">BH", wire.KIND_AUDIO, wire.MAX_PAYLOAD_BYTES + 2), "exceeds the limit"),
    (struct.pack(">BH", wire.KIND_AUDIO, 0xFFFF), "exceeds the limit"),
    (struct.pack(">BH", wire.KIND_UUID, 15), "16 bytes"),
    (struct.pack(">BH", wire.KIND_DTMF, 2), "1 byte"),
    (struct.pack(">BH", wire.KIND_AUDIO, 321), "16-bit samples"),
]


@pytest.mark.parametrize("data,words", BAD_HEADERS)
def test_a_bad_header_is_refused_before_its_payload_arrives(data, words):
    with pytest.raises(AudioSocketError) as info:
        FrameParser().feed(data[:3])  # the header alone: nothing of an oversized payload is buffered
    assert words in str(info.value) and info.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_error_frame_carries_the_status_and_a_bounded_reason():
    data = wire.error_frame(grpc.StatusCode.UNAUTHENTICATED, "x" * 5000)
    kind, length = struct.unpack(">BH", data[:3])
    assert kind == 0xFF and length == len(data) - 3 == 1 + wire.MAX_ERROR_TEXT_BYTES
    assert data[3] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert wire.error_frame(grpc.StatusCode.INTERNAL, "é" * 400)[4:].decode()  # cut on a character


def test_asterisk_error_codes_are_named():
    assert "hung up" in wire.asterisk_error(b"\x01") and "memory" in wire.asterisk_error(b"\x06")
    assert wire.asterisk_error(b"") == "no code"


def chunk(turn: int, seq: int, seconds: float) -> pb.AudioChunk:
    n = int(seconds * wire.BYTES_PER_S)
    return pb.AudioChunk(turn=turn, seq=seq, data=bytes(n), duration_s=n / wire.BYTES_PER_S)


def test_pacer_releases_the_lead_at_once_then_real_time():
    pacer = Pacer()
    pacer.add(chunk(1, 0, 2.0))
    first = pacer.due(10.0)
    assert sum(len(f) for f in first) / wire.BYTES_PER_S == pytest.approx(wire.OUT_QUEUE_S)
    assert all(len(f) == wire.FRAME_BYTES for f in first)
    assert pacer.due(10.0) == []  # nothing more until the clock moves
    assert pacer.next_due(10.0) == pytest.approx(0.0, abs=1e-4)  # the next frame is due as the first is played
    # one second later: one second more released, never more than OUT_QUEUE_S ahead of the clock
    released = sum(len(f) for t in range(1, 51) for f in pacer.due(10.0 + t * 0.02))
    assert released / wire.BYTES_PER_S == pytest.approx(1.0)
    assert pacer.queued_s(11.0) == pytest.approx(wire.OUT_QUEUE_S)


def test_barge_in_leaves_at_most_one_queue_to_play():
    pacer = Pacer()
    pacer.add(chunk(1, 0, 5.0))
    for t in range(0, 40):
        pacer.due(t * 0.02)
    now = 0.8
    dropped = pacer.clear()
    assert dropped > 3.0 and pacer.pending_bytes == 0
    assert pacer.queued_s(now) <= wire.OUT_QUEUE_S + 1e-9
    assert pacer.due(now + 0.02) == [] and pacer.next_due(now) is None


def test_progress_reports_what_was_released_of_the_turn():
    pacer = Pacer()
    assert pacer.progress() is None
    pacer.add(chunk(1, 0, 0.05))  # 2.5 frames: the third is short
    pacer.add(chunk(1, 1, 0.05))
    pacer.due(0.0)
    report = pacer.progress().playback
    assert (report.turn, report.seq) == (1, 1) and report.played_s == pytest.approx(0.1)
    pacer.add(chunk(2, 0, 0.03))  # a new turn starts its own frames and its own count
    frames = pacer.due(1.0)
    assert [len(f) for f in frames] == [320, 160]
    report = pacer.progress().playback
    assert (report.turn, report.seq) == (2, 0) and report.played_s == pytest.approx(0.03)


def test_pending_is_bounded():
    pacer = Pacer(max_pending_s=1.0)
    pacer.add(chunk(1, 0, 0.6))
    assert not pacer.full
    pacer.add(chunk(1, 1, 0.6))
    assert pacer.full
    pacer.due(0.0)
    pacer.due(0.5)
    assert not pacer.full


def test_clock_restarts_after_a_silence():
    pacer = Pacer()
    pacer.add(chunk(1, 0, 0.1))
    pacer.due(0.0)
    pacer.add(chunk(2, 0, 1.0))  # an answer after a pause: the lead goes at once again
    assert sum(len(f) for f in pacer.due(5.0)) / wire.BYTES_PER_S == pytest.approx(wire.OUT_QUEUE_S)
