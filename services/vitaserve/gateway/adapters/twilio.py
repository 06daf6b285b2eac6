"""Twilio Media Streams (bidirectional `<Connect><Stream>`), as messages of the Converse call.

Pure protocol mapping, no I/O: Twilio's JSON events in (`connected`, `start`, `media`, `dtmf`, `mark`,
`stop`) become ConverseRequest messages; the call's ConverseResponse messages become Twilio's
events out (`media`, `mark`, `clear`). The server (gateway/adapters/twilio_server.py) moves them.

What the caller heard: after each audio chunk a `mark` named for its turn and seq goes out; Twilio
echoes a mark when playback reaches it, so an echo says every chunk up to it was played, and
becomes PlaybackProgress{turn, seq, played_s = the turn's audio up to the end of that chunk}. The
call cuts an interrupted answer there (gateway/playback.py). Twilio also echoes the marks a `clear`
dropped, unplayed: once `clear` went out, the echoes of that turn are ignored.

A message that breaks the protocol raises ProtocolViolation with the WebSocket close code (RFC 6455
section 7.4.1) and a reason; the server closes the socket with them.

Telnyx's media streaming speaks the same events with its own names (the `telnyx` preset,
--twilio-preset telnyx): the stream is the top-level `stream_id`, `start` carries `call_control_id`,
`client_state`, `custom_parameters` and `media_format` {encoding PCMU or PCMA, sample_rate 8000,
channels 1}; `media` carries a `track` (inbound or outbound with both_tracks: only inbound is the
caller); it also sends `error` events. Our `media` / `mark` / `clear` go back without a stream id
(bidirectional RTP mode: the stream's codec must be set as Telnyx's bidirectional codec too).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field

from vitaserve.api import audio_pb2, conversation_pb2 as pb
from vitaserve.gateway.adapters.ws_close import INVALID_PAYLOAD, POLICY, UNSUPPORTED_DATA, ProtocolViolation

MULAW_8K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_MULAW, sample_rate=8000)
ALAW_8K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_ALAW, sample_rate=8000)
MEDIA_ENCODING, MEDIA_RATE, MEDIA_CHANNELS = "audio/x-mulaw", 8000, 1
TWILIO, TELNYX = "twilio", "telnyx"  # the presets (--twilio-preset)
TELNYX_ENCODINGS = {"PCMU": MULAW_8K, "PCMA": ALAW_8K}
# customParameters (<Parameter name=... value=...> of the <Stream>) the adapter reads; others are
# the application's own and are ignored.
PARAM_MODE, PARAM_SYSTEM_PROMPT, PARAM_SESSION_ID = "mode", "system_prompt", "session_id"
PARAM_MAX_NEW_TOKENS = "max_new_tokens"  # CallConfig.max_new_tokens, as decimal digits
PARAM_API_KEY, PARAM_AUTHORIZATION = "api_key", "authorization"  # x-api-key / `Bearer <JWT>`
# Pending marks of the turn being played: one per audio chunk, a chunk per decoder block or 64 KiB
# piece (gateway/answer.py). The longest answer fits the context (4096 tokens by default = 328 s in
# blocks of >= 10 tokens: < 410 chunks); 4096 leaves room for a larger context and bounds the map.
MAX_PENDING_MARKS = 4096
MARK_PREFIX = "vita:"
END_MARK_SUFFIX = ":end"  # vita:<turn>:end marks the end of a turn's answer (Playback.turn_ended)


def parse_event(data: str | bytes) -> tuple[str, dict]:
    """(event name, the whole message) of one WebSocket message from the platform."""
    if isinstance(data, bytes):
        raise ProtocolViolation(UNSUPPORTED_DATA, "binary frames are not part of Media Streams: send JSON text")
    try:
        message = json.loads(data)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolViolation(INVALID_PAYLOAD, "a message is not valid JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise ProtocolViolation(INVALID_PAYLOAD, 'a message must be a JSON object with an "event" string')
    return message["event"], message


def _object(message: dict, key: str) -> dict:
    value = message.get(key)
    if not isinstance(value, dict):
        raise ProtocolViolation(INVALID_PAYLOAD, f'{message["event"]}: "{key}" must be an object')
    return value


def _string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolViolation(INVALID_PAYLOAD, f'{where}: "{key}" must be a string')
    return value


@dataclass(frozen=True)
class StreamStart:
    """What a `start` event says: the stream, the call's config, and the caller's credential as
    (name, value) pairs in gRPC metadata's names (gateway/auth.py reads them)."""
    stream_sid: str
    call_sid: str
    config: pb.ConverseRequest
    credentials: tuple[tuple[str, str], ...]


def parse_start(message: dict, preset: str = TWILIO) -> StreamStart:
    if preset == TELNYX:
        return _parse_telnyx_start(message)
    start = _object(message, "start")
    stream_sid = _string(start, "streamSid", "start")
    call_sid = start.get("callSid", "")
    fmt = _object(start, "mediaFormat")
    encoding, rate, channels = fmt.get("encoding"), fmt.get("sampleRate"), fmt.get("channels")
    if (encoding, rate, channels) != (MEDIA_ENCODING, MEDIA_RATE, MEDIA_CHANNELS):
        raise ProtocolViolation(UNSUPPORTED_DATA, f"mediaFormat must be {MEDIA_ENCODING} {MEDIA_RATE} Hz "
                                f"{MEDIA_CHANNELS} channel, got {encoding} {rate} Hz {channels}")
    return _stream_start(stream_sid, call_sid, MULAW_8K, start.get("customParameters", {}), "customParameters")


def _parse_telnyx_start(message: dict) -> StreamStart:
    start = _object(message, "start")
    stream_id = message.get("stream_id", start.get("stream_id"))
    if not isinstance(stream_id, str):
        raise ProtocolViolation(INVALID_PAYLOAD, 'start: "stream_id" must be a string')
    fmt = _object(start, "media_format")
    encoding, rate, channels = fmt.get("encoding"), fmt.get("sample_rate"), fmt.get("channels", 1)
    if (not isinstance(encoding, str) or encoding not in TELNYX_ENCODINGS or str(rate) != str(MEDIA_RATE)
            or str(channels) != str(MEDIA_CHANNELS)):
        raise ProtocolViolation(UNSUPPORTED_DATA, f"media_format must be PCMU or PCMA at {MEDIA_RATE} Hz, "
                                f"{MEDIA_CHANNELS} channel, got {str(encoding)[:20]} {str(rate)[:10]} Hz "
                                f"{str(channels)[:4]}")
    return _stream_start(stream_id, start.get("call_control_id", ""), TELNYX_ENCODINGS[encoding],
                         start.get("custom_parameters", {}), "custom_parameters")


def _stream_start(stream_sid: str, call_sid, fmt: audio_pb2.AudioFormat, params, where: str) -> StreamStart:
    """The call's config and credential from the stream's parameters (the same names on both presets)."""
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise ProtocolViolation(INVALID_PAYLOAD, f'start: "{where}" must map names to strings')
    config = pb.CallConfig(input_format=fmt, output_format=fmt, mode=params.get(PARAM_MODE, ""),
                           session_id=params.get(PARAM_SESSION_ID, ""))
    if PARAM_MAX_NEW_TOKENS in params:
        digits = params[PARAM_MAX_NEW_TOKENS]
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 9):
            raise ProtocolViolation(POLICY, f"{where}.{PARAM_MAX_NEW_TOKENS} must be a whole number, "
                                    f"got {digits[:20]!r}")
        config.max_new_tokens = int(digits)
    if PARAM_SYSTEM_PROMPT in params:
        config.system_prompt = params[PARAM_SYSTEM_PROMPT]
    credentials = tuple((name, params[param]) for param, name in
                        ((PARAM_API_KEY, "x-api-key"), (PARAM_AUTHORIZATION, "authorization")) if param in params)
    return StreamStart(stream_sid, call_sid if isinstance(call_sid, str) else "",
                       pb.ConverseRequest(config=config), credentials)


def media_payload(message: dict) -> bytes | None:
    """The audio bytes of a `media` event; None for Telnyx's outbound track (both_tracks), which is
    the call's other side, not the caller (Twilio sends only inbound on <Connect>)."""
    media = _object(message, "media")
    if media.get("track") == "outbound":
        return None
    payload = _string(media, "payload", "media")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolViolation(INVALID_PAYLOAD, "media.payload is not base64") from None


def mark_name(message: dict) -> str:
    return _string(_object(message, "mark"), "name", "mark")


def dtmf_digit(message: dict) -> str:
    return _string(_object(message, "dtmf"), "digit", "dtmf")


def signature_valid(auth_token: str, url: str, signature: str) -> bool:
    """Twilio's request signature: base64 of HMAC-SHA1 keyed with the account's auth token over the
    URL it called (a WebSocket upgrade is a GET: no form parameters follow the URL)."""
    expected = base64.b64encode(hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()).decode()
    return hmac.compare_digest(expected.encode(), signature.encode())


# ---- out: Twilio names the stream in every event; Telnyx takes them on the stream's own socket --------
def _out(event: dict, stream_sid: str, preset: str) -> str:
    return json.dumps(event if preset == TELNYX else {"event": event["event"], "streamSid": stream_sid, **event})


def media_event(stream_sid: str, audio: bytes, preset: str = TWILIO) -> str:
    return _out({"event": "media", "media": {"payload": base64.b64encode(audio).decode()}}, stream_sid, preset)


def mark_event(stream_sid: str, name: str, preset: str = TWILIO) -> str:
    return _out({"event": "mark", "mark": {"name": name}}, stream_sid, preset)


def clear_event(stream_sid: str, preset: str = TWILIO) -> str:
    return _out({"event": "clear"}, stream_sid, preset)


def error_description(message: dict) -> str:
    """What a Telnyx `error` event says, for the log (its fields are not relied on)."""
    payload = message.get("payload", message.get("error", {}))
    return json.dumps(payload)[:200] if payload else "no details"


@dataclass
class Playback:
    """The marks sent for the turn being played, and what their echoes say was heard."""
    turn: int = 0
    audio_s: float = 0.0                 # the turn's audio sent so far
    pending: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # name -> (turn, seq, end_s)

    @staticmethod
    def turn_ended(turn: int) -> str:
        """The mark sent when a turn's answer ended (finished, cut or failed): Media Streams has no
        end-of-answer event, so this tells the platform's application (and the load test's client)
        that nothing more of this answer follows. Its echo means nothing to the call."""
        return f"{MARK_PREFIX}{turn}{END_MARK_SUFFIX}"

    def sent(self, chunk: pb.AudioChunk) -> str:
        """The mark to send after `chunk`: its name says the turn and seq of the audio it follows."""
        if chunk.turn != self.turn:
            self.turn, self.audio_s = chunk.turn, 0.0
            self.pending.clear()  # an earlier turn's echoes are late: the call ignores them anyway
        self.audio_s += chunk.duration_s
        name = f"{MARK_PREFIX}{chunk.turn}:{chunk.seq}"
        if len(self.pending) < MAX_PENDING_MARKS:
            self.pending[name] = (chunk.turn, chunk.seq, self.audio_s)
        return name

    @property
    def playing(self) -> bool:
        """Audio sent that the platform has not played yet (marks not echoed)."""
        return bool(self.pending)

    def cleared(self) -> None:
        """`clear` went out: the marks it drops come back unplayed; none of them says anything."""
        self.pending.clear()

    def echoed(self, name: str) -> pb.ConverseRequest | None:
        """The PlaybackProgress an echoed mark means, or None (not ours, late, or dropped by clear)."""
        entry = self.pending.pop(name, None)
        if entry is None:
            return None
        turn, seq, end_s = entry
        for other in [n for n, (t, s, _) in self.pending.items() if t == turn and s < seq]:
            del self.pending[other]  # played before it (marks are echoed in order)
        return pb.ConverseRequest(playback=pb.PlaybackProgress(turn=turn, seq=seq, played_s=end_s))
