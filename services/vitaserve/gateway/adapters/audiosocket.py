"""Asterisk AudioSocket, as messages of the Converse call: framing and pacing, no I/O.

The wire (Asterisk's res_audiosocket and its protocol page): each message is a kind byte, a payload
length as a 16-bit big-endian unsigned integer, then the payload. Kinds:
  0x00 hang-up        either way; from us it ends the AudioSocket() application
  0x01 UUID           Asterisk -> us, first, 16 bytes: the stream's UUID (the dialplan's argument)
  0x03 DTMF           Asterisk -> us, 1 ASCII byte
  0x10 audio          both ways: signed linear 16-bit little-endian mono at 8 kHz
  0x11..0x18 audio    newer Asterisk: slin at 12, 16, 24, 32, 44.1, 48, 96 or 192 kHz; not taken here
  0xff error          Asterisk -> us: an optional code (0x01 the caller hung up, 0x02 frame
                      forwarding error, 0x04 memory error); us -> Asterisk: see `error_frame`
The stream's UUID names the session: its 16 bytes as 32 lowercase hex digits are the project's
session id form (common/keys.py), so a call with the same UUID resumes the session.

AudioSocket has no flush: audio written to the socket is played. So the answer's audio is released
in real time, in 20 ms frames, at most OUT_QUEUE_S ahead of the play clock (`Pacer`); the rest waits
here, where a barge-in drops it. Playback stops within OUT_QUEUE_S of the barge-in reaching the
adapter, and what was released is what the caller hears (reported to the call as PlaybackProgress).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

import grpc

from vitaserve.api import audio_pb2, conversation_pb2 as pb

KIND_HANGUP, KIND_UUID, KIND_DTMF, KIND_AUDIO, KIND_ERROR = 0x00, 0x01, 0x03, 0x10, 0xFF
HIGHER_RATE_AUDIO = frozenset(range(0x11, 0x19))  # slin12 ... slin192 (Asterisk 22+)
KIND_NAMES = {KIND_HANGUP: "hang-up", KIND_UUID: "UUID", KIND_DTMF: "DTMF", KIND_AUDIO: "audio",
              KIND_ERROR: "error"}
HEADER_BYTES = 3
UUID_BYTES = 16
SAMPLE_RATE = 8000
BYTES_PER_S = 2 * SAMPLE_RATE
FRAME_S = 0.02
FRAME_BYTES = int(FRAME_S * BYTES_PER_S)  # 320: one 20 ms frame of 8 kHz slin
PCM16_8K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_PCM16, sample_rate=SAMPLE_RATE)
# Asterisk sends one voice frame per packetization interval (20 ms = 320 bytes by default, at most a
# few hundred ms); 8 KiB is 256 ms of 8 kHz slin and bounds what one connection buffers before a
# frame is whole. A larger payload is refused with an error frame (the 16-bit length allows 64 KiB).
MAX_PAYLOAD_BYTES = 8 * 1024
# The outgoing queue: audio released to the socket ahead of the play clock. AudioSocket cannot take
# it back, so a barge-in stops playback within this much audio; it also absorbs this much stall of
# the event loop before the caller hears a gap. 200 ms = 10 frames.
OUT_QUEUE_S = 0.2
# How often the adapter tells the call what was played: one audio token is 80 ms (12.5 tokens/s),
# so the history's cut after a barge-in is within one token of what was released.
REPORT_EVERY_S = 0.08
# Audio received from the call and not yet released: one answer at most (a 4096-token context holds
# < 330 s of audio), so 400 s (6.4 MB of slin) bounds it; past it the adapter stops reading the call
# until the pacer catches up.
MAX_PENDING_S = 400.0
# Our error frame's payload: the gRPC status code of the failure (1 byte), then its reason in UTF-8,
# cut to MAX_ERROR_TEXT_BYTES. Asterisk logs an error frame and ends AudioSocket().
MAX_ERROR_TEXT_BYTES = 512


class AudioSocketError(Exception):
    """A frame the adapter cannot take, or a call that failed: answered with an error frame carrying
    `status` and the message, then the socket closes."""

    def __init__(self, status: grpc.StatusCode, message: str):
        super().__init__(message)
        self.status = status


def _violation(message: str) -> AudioSocketError:
    return AudioSocketError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Frame:
    kind: int
    payload: bytes


class FrameParser:
    """Bytes from the socket in, whole frames out, however the bytes were split. Holds at most one
    header and MAX_PAYLOAD_BYTES. A kind it does not know, a payload over the limit or of the wrong
    size for its kind raises AudioSocketError at once (its header is enough to tell)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD_BYTES):
        self.max_payload = max_payload
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER_BYTES:
            kind, length = self._buffer[0], struct.unpack_from(">H", self._buffer, 1)[0]
            check_header(kind, length, self.max_payload)
            if len(self._buffer) < HEADER_BYTES + length:
                break
            frames.append(Frame(kind, bytes(self._buffer[HEADER_BYTES:HEADER_BYTES + length])))
            del self._buffer[:HEADER_BYTES + length]
        return frames

    @property
    def partial(self) -> bool:
        """Bytes of a frame not yet whole: a socket closed now was closed mid-frame."""
        return bool(self._buffer)


def check_header(kind: int, length: int, max_payload: int = MAX_PAYLOAD_BYTES) -> None:
    if kind in HIGHER_RATE_AUDIO:
        raise _violation(f"audio kind 0x{kind:02x} is slin above 8 kHz: this endpoint takes 8 kHz signed "
                         "linear (kind 0x10) only; use AudioSocket() from the dialplan, which sends slin")
    if kind not in KIND_NAMES:
        raise _violation(f"unknown frame kind 0x{kind:02x}: AudioSocket kinds are 0x00 hang-up, 0x01 UUID, "
                         "0x03 DTMF, 0x10 audio, 0xff error")
    if length > max_payload:
        raise _violation(f"{KIND_NAMES[kind]} frame of {length} bytes exceeds the limit of {max_payload}")
    if kind == KIND_UUID and length != UUID_BYTES:
        raise _violation(f"a UUID frame carries {UUID_BYTES} bytes, not {length}")
    if kind == KIND_DTMF and length != 1:
        raise _violation(f"a DTMF frame carries 1 byte, not {length}")
    if kind == KIND_AUDIO and length % 2:
        raise _violation(f"an audio frame of {length} bytes is not whole 16-bit samples")


def session_id(uuid_payload: bytes) -> str:
    """The session a stream's UUID names: its 16 bytes as 32 lowercase hex digits."""
    return uuid_payload.hex()


def dtmf_digit(payload: bytes) -> str:
    digit = chr(payload[0])
    return digit if digit in "0123456789*#ABCDabcd" else "?"


def asterisk_error(payload: bytes) -> str:
    """What an error frame from Asterisk says, for the log."""
    if not payload:
        return "no code"
    code = payload[0]
    names = [name for bit, name in ((0x01, "the caller hung up"), (0x02, "frame forwarding error"),
                                    (0x04, "memory error")) if code & bit]
    return f"0x{code:02x} ({', '.join(names) or 'application-specific'})"


# ---- out ------------------------------------------------------------------------------------------
def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


HANGUP_FRAME = frame(KIND_HANGUP)


def error_frame(status: grpc.StatusCode, message: str) -> bytes:
    """An error frame: the gRPC status code of the failure (1 byte), then the reason in UTF-8."""
    text = message.encode()[:MAX_ERROR_TEXT_BYTES].decode(errors="ignore").encode()
    return frame(KIND_ERROR, bytes([status.value[0]]) + text)


@dataclass
class _Chunk:
    turn: int
    seq: int
    data: bytes
    offset: int = 0


class Pacer:
    """The answer's audio, released in 20 ms frames at real-time pace, at most `lead_s` ahead of the
    play clock. Times are passed in (seconds of a monotonic clock), so tests drive it directly.

    The play clock starts when audio is first released after a silence: the first `lead_s` go at
    once, then one frame per 20 ms. A frame holds audio of one turn; it ends early at a turn's end."""

    def __init__(self, lead_s: float = OUT_QUEUE_S, max_pending_s: float = MAX_PENDING_S):
        self.lead_s, self.max_pending_s = lead_s, max_pending_s
        self._chunks: deque[_Chunk] = deque()
        self.pending_bytes = 0
        self._clock_at = 0.0     # when the play clock started
        self._released = 0       # bytes of audio released since then (whole numbers: no drift)
        self.turn = 0            # the turn being played, its audio released so far, its last chunk
        self.turn_released_s = 0.0
        self.seq = -1

    @property
    def pending_s(self) -> float:
        return self.pending_bytes / BYTES_PER_S

    @property
    def full(self) -> bool:
        return self.pending_s >= self.max_pending_s

    def add(self, chunk: pb.AudioChunk) -> None:
        if chunk.data:
            self._chunks.append(_Chunk(chunk.turn, chunk.seq, bytes(chunk.data)))
            self.pending_bytes += len(chunk.data)

    def queued_s(self, now: float) -> float:
        """Audio released and not yet played by the clock: what a barge-in now cannot stop."""
        return max(0.0, self._released / BYTES_PER_S - (now - self._clock_at))

    def clear(self) -> float:
        """Barge-in: drop what was not released; the seconds dropped."""
        dropped = self.pending_s
        self._chunks.clear()
        self.pending_bytes = 0
        return dropped

    def due(self, now: float) -> list[bytes]:
        """The frames to write now."""
        if self._released <= (now - self._clock_at) * BYTES_PER_S:  # the clock ran past all it was given
            self._clock_at, self._released = now, 0  # restart it
        limit = int((now - self._clock_at + self.lead_s) * BYTES_PER_S + 1e-6)  # 1e-6 byte: float rounding
        frames = []
        while self._chunks and self._released < limit:
            data = self._take()
            self._released += len(data)
            self.turn_released_s += len(data) / BYTES_PER_S
            frames.append(data)
        return frames

    def next_due(self, now: float) -> float | None:
        """Seconds until the next frame may go; None when nothing waits."""
        if not self._chunks:
            return None
        return max(0.0, self._clock_at + (self._released + 1) / BYTES_PER_S - self.lead_s - now)

    def _take(self) -> bytes:
        turn = self._chunks[0].turn
        if turn != self.turn:
            self.turn, self.turn_released_s, self.seq = turn, 0.0, -1
        out = bytearray()
        while self._chunks and self._chunks[0].turn == turn and len(out) < FRAME_BYTES:
            head = self._chunks[0]
            piece = head.data[head.offset:head.offset + FRAME_BYTES - len(out)]
            out += piece
            head.offset += len(piece)
            self.seq = head.seq
            if head.offset >= len(head.data):
                self._chunks.popleft()
        self.pending_bytes -= len(out)
        return bytes(out)

    def progress(self) -> pb.ConverseRequest | None:
        """PlaybackProgress of the turn being played: its audio released so far (the caller hears it:
        it cannot be taken back), or None before any."""
        if self.seq < 0:
            return None
        return pb.ConverseRequest(playback=pb.PlaybackProgress(turn=self.turn, seq=self.seq,
                                                               played_s=self.turn_released_s))
