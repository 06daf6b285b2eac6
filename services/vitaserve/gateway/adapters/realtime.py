"""OpenAI Realtime (server side of its WebSocket protocol), as messages of the Converse call.

Pure protocol mapping, no I/O. The client's JSON events (`session.update`, `input_audio_buffer.*`,
`response.create` / `cancel`, `conversation.item.truncate`) are checked here and become a CallConfig,
AudioFrames and Controls; the call's ConverseResponse messages become the protocol's server events.
The server (gateway/adapters/realtime_server.py) moves them and owns the order.

Two schemas, as the `openai` SDK speaks them: GA (`client.realtime.connect`, the default) and the
older beta (`client.beta.realtime.connect`, which sends the upgrade header `OpenAI-Beta: realtime=v1`).
They differ in names only: beta's session has `input_audio_format` / `output_audio_format` /
`turn_detection` at its top, its audio events are `response.audio.delta` and
`response.audio_transcript.delta`, an item is announced by `conversation.item.created`, and an
assistant's audio content part is of type `audio` (GA: `output_audio`).

What the protocol can continue after (a bad field, an unknown event, bad base64) is an `error`
event (RealtimeError raised here, the server sends it); a frame it cannot read at all is the
library's close (1009 for an oversized one).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from dataclasses import dataclass, field

from vitaserve.api import audio_pb2, conversation_pb2 as pb
from vitaserve.common.audio_facts import TOKENS_PER_SECOND

GA, BETA = "ga", "beta"
BETA_HEADER, BETA_VALUE = "OpenAI-Beta", "realtime=v1"

PCM_24K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_PCM16, sample_rate=24000)
MULAW_8K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_MULAW, sample_rate=8000)
ALAW_8K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_ALAW, sample_rate=8000)
GA_FORMATS = {"audio/pcm": PCM_24K, "audio/pcmu": MULAW_8K, "audio/pcma": ALAW_8K}
BETA_FORMATS = {"pcm16": PCM_24K, "g711_ulaw": MULAW_8K, "g711_alaw": ALAW_8K}
BYTES_PER_SECOND = {audio_pb2.AUDIO_CODEC_PCM16: 48000, audio_pb2.AUDIO_CODEC_MULAW: 8000,
                    audio_pb2.AUDIO_CODEC_ALAW: 8000}
# OpenAI's published defaults of server_vad; threshold and silence map onto VadOptions, the gateway's
# VAD keeps its own pre-roll (300 ms, the same as prefix_padding_ms' default).
DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
               "create_response": True, "interrupt_response": True}
MIN_COMMIT_S = 0.1  # a commit of less audio is refused (the call's own END_OF_UTTERANCE floor)
# A client event arrives as one text frame: an append of a whole second of 24 kHz PCM is 64 KiB of
# base64; instructions of up to 16 Ki characters (the call's limit at 4096 context tokens, each up to
# 6 bytes as a JSON \\uXXXX escape) are 96 KiB. 256 KiB holds either with room; larger closes with 1009.
MAX_MESSAGE_BYTES = 256 * 1024

CLIENT_EVENTS = frozenset({"session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                           "input_audio_buffer.clear", "response.create", "response.cancel",
                           "conversation.item.truncate"})
# Client events of the protocol this gateway does not carry out (text input, item edits, tools):
# answered with an error naming the event, unlike an unknown name.
UNSUPPORTED_EVENTS = frozenset({"conversation.item.create", "conversation.item.delete", "conversation.item.retrieve",
                                "output_audio_buffer.clear", "transcription_session.update"})


class RealtimeError(Exception):
    """A client event the session answers with an `error` event and then goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 error_type: str = "invalid_request_error", event_id: str | None = None):
        super().__init__(message)
        self.code, self.param, self.error_type, self.event_id = code, param, error_type, event_id


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def schema_of(headers) -> str:
    """BETA when the upgrade carries `OpenAI-Beta: realtime=v1` (the SDK's beta client), else GA."""
    values = headers.get_all(BETA_HEADER) if hasattr(headers, "get_all") else [headers.get(BETA_HEADER, "")]
    return BETA if any(BETA_VALUE in (v or "").replace(" ", "") for v in values) else GA


def credentials_of(headers) -> tuple[tuple[str, str], ...]:
    """The upgrade's credential in gRPC metadata's names (gateway/auth.py): the SDK sends its api_key
    as `Authorization: Bearer <key>`; a JWT there stays a bearer token, anything else is an API key.
    An `x-api-key` header is taken as it is."""
    found = [("x-api-key", v) for v in headers.get_all("x-api-key")]
    for value in headers.get_all("authorization"):
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token and not _looks_like_jwt(token):
            found.append(("x-api-key", token))
        else:
            found.append(("authorization", value))
    return tuple(found)


def _looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts[:2]) and token.startswith("eyJ")


def parse_event(data: str | bytes) -> tuple[str, dict]:
    """(type, the whole event) of one client frame; RealtimeError for what is not an event."""
    if isinstance(data, bytes):
        raise RealtimeError("binary frames are not part of the Realtime protocol: send JSON text events",
                            code="invalid_event")
    try:
        event = json.loads(data)
    except (json.JSONDecodeError, RecursionError):
        raise RealtimeError("the event is not valid JSON", code="invalid_json") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise RealtimeError('an event must be a JSON object with a "type" string', code="invalid_event",
                            param="type")
    event_id = event.get("event_id")
    if event["type"] not in CLIENT_EVENTS:
        name = event["type"][:60]
        if event["type"] in UNSUPPORTED_EVENTS:
            raise RealtimeError(f"`{name}` is not supported by this server (audio in, audio out only)",
                                code="unsupported_event", param="type", event_id=_id(event_id))
        raise RealtimeError(f"unknown event type {name!r}", code="invalid_event", param="type",
                            event_id=_id(event_id))
    return event["type"], event


def _id(value) -> str | None:
    return value[:100] if isinstance(value, str) else None


def appended_audio(event: dict, fmt: audio_pb2.AudioFormat) -> bytes:
    """The bytes of an `input_audio_buffer.append` in the session's input format."""
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise RealtimeError('input_audio_buffer.append: "audio" must be a base64 string', param="audio",
                            event_id=_id(event.get("event_id")))
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError("input_audio_buffer.append: audio is not base64", param="audio",
                            event_id=_id(event.get("event_id"))) from None
    if fmt.codec == audio_pb2.AUDIO_CODEC_PCM16 and len(data) % 2:
        raise RealtimeError("input_audio_buffer.append: audio/pcm is 16-bit samples: an even number of bytes",
                            param="audio", event_id=_id(event.get("event_id")))
    return data


def truncate_args(event: dict) -> tuple[str, int]:
    """(item_id, audio_end_ms) of a `conversation.item.truncate`."""
    eid = _id(event.get("event_id"))
    item_id, end_ms, index = event.get("item_id"), event.get("audio_end_ms"), event.get("content_index", 0)
    if not isinstance(item_id, str):
        raise RealtimeError('conversation.item.truncate: "item_id" must be a string', param="item_id", event_id=eid)
    if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
        raise RealtimeError('conversation.item.truncate: "audio_end_ms" must be a whole number >= 0',
                            param="audio_end_ms", event_id=eid)
    if index != 0:
        raise RealtimeError("conversation.item.truncate: an answer has one content part: content_index 0",
                            param="content_index", event_id=eid)
    return item_id, end_ms


# ---- the session's settings ------------------------------------------------------------------------
@dataclass
class SessionSettings:
    """What session.update set; `call_config` makes it the call's CallConfig."""
    input_format: str = "audio/pcm"     # GA names; the beta ones are translated
    output_format: str = "audio/pcm"
    turn_detection: dict | None = field(default_factory=lambda: dict(DEFAULT_VAD))
    instructions: str | None = None
    max_output_tokens: int = 0          # 0: the server default ("inf")

    def update(self, session, schema: str, event_id: str | None = None) -> None:
        """Apply a session.update's `session` (fields left out keep their values); RealtimeError
        names the first field it cannot take, and then nothing changes."""
        def bad(message: str, param: str) -> RealtimeError:
            return RealtimeError(message, param=param, event_id=event_id)

        if not isinstance(session, dict):
            raise bad('session.update: "session" must be an object', "session")
        new = SessionSettings(self.input_format, self.output_format,
                              None if self.turn_detection is None else dict(self.turn_detection),
                              self.instructions, self.max_output_tokens)
        if schema == GA:
            if session.get("type", "realtime") != "realtime":
                raise bad(f'session.type must be "realtime", got {str(session.get("type"))[:40]!r}', "session.type")
            audio = session.get("audio", {})
            if not isinstance(audio, dict):
                raise bad('session.audio must be an object', "session.audio")
            inp, out = audio.get("input", {}), audio.get("output", {})
            if not isinstance(inp, dict) or not isinstance(out, dict):
                raise bad("session.audio.input and .output must be objects", "session.audio")
            if "format" in inp:
                new.input_format = _ga_format(inp["format"], "session.audio.input.format", event_id)
            if "format" in out:
                new.output_format = _ga_format(out["format"], "session.audio.output.format", event_id)
            if "turn_detection" in inp:
                new.turn_detection = _turn_detection(inp["turn_detection"], "session.audio.input.turn_detection",
                                                     event_id)
            limit, limit_name = session.get("max_output_tokens"), "session.max_output_tokens"
        else:
            for key, attr in (("input_audio_format", "input_format"), ("output_audio_format", "output_format")):
                if key in session:
                    value = session[key]
                    if value not in BETA_FORMATS:
                        raise bad(f"session.{key} must be one of {', '.join(BETA_FORMATS)}, got {str(value)[:40]!r}",
                                  f"session.{key}")
                    setattr(new, attr, _GA_OF_BETA[value])
            if "turn_detection" in session:
                new.turn_detection = _turn_detection(session["turn_detection"], "session.turn_detection", event_id)
            limit, limit_name = session.get("max_response_output_tokens"), "session.max_response_output_tokens"
        if "instructions" in session:
            if not isinstance(session["instructions"], str):
                raise bad("session.instructions must be a string", "session.instructions")
            new.instructions = session["instructions"]
        if limit is not None:
            if limit == "inf":
                new.max_output_tokens = 0
            elif isinstance(limit, int) and not isinstance(limit, bool) and 1 <= limit <= 4096:
                new.max_output_tokens = limit
            else:
                raise bad(f'{limit_name} must be a whole number in [1, 4096] or "inf", got {str(limit)[:20]!r}',
                          limit_name)
        self.__dict__.update(new.__dict__)

    @property
    def push_to_talk(self) -> bool:
        return self.turn_detection is None

    def call_config(self, mode: str = "", session_id: str = "", max_new_tokens: int = 0) -> pb.ConverseRequest:
        """The call's first message: formats, VAD or push-to-talk, system prompt, answer length."""
        config = pb.CallConfig(input_format=GA_FORMATS[self.input_format], output_format=GA_FORMATS[self.output_format],
                               mode=mode, session_id=session_id, push_to_talk=self.push_to_talk,
                               max_new_tokens=self.max_output_tokens or max_new_tokens)
        if self.instructions is not None:
            config.system_prompt = self.instructions
        if self.turn_detection is not None:
            config.vad.threshold = self.turn_detection["threshold"]
            config.vad.min_silence_ms = self.turn_detection["silence_duration_ms"]
        return pb.ConverseRequest(config=config)

    def same_call(self, other: "SessionSettings") -> bool:
        """True when `other` would give the call the same config (an update a running call can take)."""
        return self.call_config() == other.call_config()

    def as_session(self, schema: str, session_id: str, model: str) -> dict:
        """The session object of session.created / session.updated."""
        limit = self.max_output_tokens or "inf"
        if schema == GA:
            audio_in = {"format": _ga_format_object(self.input_format), "turn_detection": self.turn_detection}
            return {"type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
                    "output_modalities": ["audio"], "instructions": self.instructions or "",
                    "audio": {"input": audio_in, "output": {"format": _ga_format_object(self.output_format)}},
                    "max_output_tokens": limit, "tools": [], "tool_choice": "auto"}
        return {"object": "realtime.session", "id": session_id, "model": model, "modalities": ["audio", "text"],
                "instructions": self.instructions or "", "input_audio_format": _BETA_OF_GA[self.input_format],
                "output_audio_format": _BETA_OF_GA[self.output_format], "turn_detection": self.turn_detection,
                "max_response_output_tokens": limit, "tools": [], "tool_choice": "auto"}


_GA_OF_BETA = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
_BETA_OF_GA = {v: k for k, v in _GA_OF_BETA.items()}


def _ga_format(value, param: str, event_id: str | None) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in GA_FORMATS:
        raise RealtimeError(f"{param}.type must be one of {', '.join(GA_FORMATS)}, got {str(kind)[:40]!r}",
                            param=param, event_id=event_id)
    rate = value.get("rate", 24000)
    if kind == "audio/pcm" and rate != 24000:
        raise RealtimeError(f"{param}: audio/pcm is taken at rate 24000 only, got {str(rate)[:20]}",
                            param=f"{param}.rate", event_id=event_id)
    return kind


def _ga_format_object(kind: str) -> dict:
    return {"type": kind, "rate": 24000} if kind == "audio/pcm" else {"type": kind}


def _turn_detection(value, param: str, event_id: str | None) -> dict | None:
    """A server_vad object with its defaults filled in, or None (the client commits each turn)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
        kind = value.get("type") if isinstance(value, dict) else value
        raise RealtimeError(f'{param}: only "server_vad" or null is supported, got {str(kind)[:40]!r}',
                            param=f"{param}.type", event_id=event_id)
    vad = {**DEFAULT_VAD, **{k: v for k, v in value.items() if v is not None}}
    threshold = vad["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise RealtimeError(f"{param}.threshold must be a number between 0 and 1 (exclusive), got {threshold!r}",
                            param=f"{param}.threshold", event_id=event_id)
    for name, lo, hi in (("silence_duration_ms", 32, 10_000), ("prefix_padding_ms", 0, 5_000)):
        ms = vad[name]
        if isinstance(ms, bool) or not isinstance(ms, int) or not lo <= ms <= hi:
            raise RealtimeError(f"{param}.{name} must be a whole number of ms in [{lo}, {hi}], got {ms!r}",
                                param=f"{param}.{name}", event_id=event_id)
    for name in ("create_response", "interrupt_response"):
        if vad[name] is not True:
            raise RealtimeError(f"{param}.{name}: only true is supported (the server answers each utterance "
                                "and stops its answer when the caller speaks)", param=f"{param}.{name}",
                                event_id=event_id)
    vad["threshold"] = float(threshold)
    return {k: vad[k] for k in DEFAULT_VAD}


# ---- events out ------------------------------------------------------------------------------------
def error_event(exc: RealtimeError) -> dict:
    return {"type": "error", "event_id": new_id("event"), "error": {
        "type": exc.error_type, "code": exc.code, "message": str(exc), "param": exc.param,
        "event_id": exc.event_id}}


def _event(kind: str, **fields) -> dict:
    return {"type": kind, "event_id": new_id("event"), **fields}


@dataclass
class Response:
    """One turn's answer as a Realtime response with one assistant message item."""
    turn: int
    id: str = field(default_factory=lambda: new_id("resp"))
    item_id: str = field(default_factory=lambda: new_id("item"))
    transcript: str = ""
    chunk_ends_s: list[float] = field(default_factory=list)  # each audio chunk's end in the turn's audio
    input_audio_s: float = 0.0
    done: bool = False

    @property
    def audio_s(self) -> float:
        return self.chunk_ends_s[-1] if self.chunk_ends_s else 0.0


class Translator:
    """The call's messages -> the protocol's server events, with the ids and per-turn state both need
    (which response and item a turn is, the audio each item sent: what a truncate refers to)."""

    # responses kept for truncate: the last few (only the last stored turn can be cut, and a truncate
    # for an older one gets an error naming why); bounds the map on a long call
    KEEP_RESPONSES = 8

    def __init__(self, schema: str, conversation_id: str = ""):
        self.schema = schema
        self.conversation_id = conversation_id
        self.responses: dict[int, Response] = {}
        self.by_item: dict[str, Response] = {}
        self.last_item_id: str | None = None
        self.pending_user_item: tuple[str, float] | None = None  # (item id, seconds) of the committed input
        self.speech_item: str | None = None                      # the item id speech_started named
        self.active: Response | None = None                     # the response being generated
        self.requested = False   # an utterance handed to the call whose answer has not begun (or failed) yet
        self.cancelling = False  # the client's response.cancel went to the call: the next cancel is its

    # -- names that differ between the schemas
    @property
    def _item_added(self) -> str:
        return "conversation.item.added" if self.schema == GA else "conversation.item.created"

    @property
    def _audio_delta(self) -> str:
        return "response.output_audio.delta" if self.schema == GA else "response.audio.delta"

    @property
    def _audio_done(self) -> str:
        return "response.output_audio.done" if self.schema == GA else "response.audio.done"

    @property
    def _transcript_delta(self) -> str:
        return "response.output_audio_transcript.delta" if self.schema == GA else "response.audio_transcript.delta"

    @property
    def _transcript_done(self) -> str:
        return "response.output_audio_transcript.done" if self.schema == GA else "response.audio_transcript.done"

    # -- items
    def _user_item(self, item_id: str, status: str) -> dict:
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": status,
                "content": [{"type": "input_audio", "transcript": None}]}

    def _assistant_item(self, response: Response, status: str) -> dict:
        kind = "output_audio" if self.schema == GA else "audio"
        return {"id": response.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": [{"type": kind, "transcript": response.transcript}]}

    def _added(self, item: dict) -> list[dict]:
        previous, self.last_item_id = self.last_item_id, item["id"]
        events = [_event(self._item_added, previous_item_id=previous, item=item)]
        if self.schema == GA and item["role"] == "user":
            events.append(_event("conversation.item.done", previous_item_id=previous, item=item))
        return events

    def committed(self, audio_s: float) -> list[dict]:
        """The input buffer became a user item (a client's commit, or the end of speech under VAD)."""
        item_id = self.speech_item or new_id("item")
        self.speech_item = None
        self.pending_user_item = (item_id, audio_s)
        return [_event("input_audio_buffer.committed", previous_item_id=self.last_item_id, item_id=item_id),
                *self._added(self._user_item(item_id, "completed"))]

    def cleared(self) -> list[dict]:
        return [_event("input_audio_buffer.cleared")]

    def truncated(self, item_id: str, audio_end_ms: int) -> list[dict]:
        return [_event("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)]

    # -- responses
    def _response_object(self, response: Response, status: str, usage: dict | None = None,
                         status_details: dict | None = None) -> dict:
        done = status != "in_progress"
        fmt = {"object": "realtime.response", "id": response.id, "status": status, "status_details": status_details,
               "conversation_id": self.conversation_id, "usage": usage,
               "output": [self._assistant_item(response, "completed" if status == "completed" else
                                               "incomplete" if done else "in_progress")] if done else []}
        if self.schema == GA:
            fmt["output_modalities"] = ["audio"]
        else:
            fmt["modalities"] = ["audio", "text"]
        return fmt

    def _begin(self, turn: int) -> list[dict]:
        """response.created and its item, at the first message of a turn."""
        response = Response(turn=turn)
        if self.pending_user_item is not None:
            response.input_audio_s = self.pending_user_item[1]
            self.pending_user_item = None
        self.responses[turn] = response
        self.by_item[response.item_id] = response
        for old in sorted(self.responses)[:-self.KEEP_RESPONSES]:
            self.by_item.pop(self.responses.pop(old).item_id, None)
        self.active, self.requested = response, False
        item = self._assistant_item(response, "in_progress")
        return [_event("response.created", response=self._response_object(response, "in_progress")),
                _event("response.output_item.added", response_id=response.id, output_index=0, item=item),
                *self._added(item)]

    def _finish(self, response: Response, status: str, usage: dict, status_details: dict | None = None) -> list[dict]:
        response.done = True
        if self.active is response:
            self.active = None
        ids = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
        item = self._assistant_item(response, "completed" if status == "completed" else "incomplete")
        events = [_event(self._audio_done, **ids), _event(self._transcript_done, transcript=response.transcript, **ids),
                  _event("response.output_item.done", response_id=response.id, output_index=0, item=item)]
        if self.schema == GA:
            events.append(_event("conversation.item.done", previous_item_id=None, item=item))
        events.append(_event("response.done", response=self._response_object(response, status, usage, status_details)))
        return events

    def _usage(self, response: Response, text_tokens: int, audio_tokens: int) -> dict:
        """Tokens of the turn: the answer's as the engine counted them; the input's as the caller's
        audio at the speech tokenizer's 12.5 tokens/s (the history of earlier turns is not counted)."""
        audio_in = round(response.input_audio_s * TOKENS_PER_SECOND)
        return {"total_tokens": audio_in + text_tokens + audio_tokens, "input_tokens": audio_in,
                "output_tokens": text_tokens + audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_in, "cached_tokens": 0},
                "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens}}

    def events(self, message: pb.ConverseResponse) -> list[dict]:
        kind = message.WhichOneof("message")
        if kind == "session_started":
            self.conversation_id = message.session_started.session_id
            return []
        if kind == "speech_started":
            self.speech_item = new_id("item")
            return [_event("input_audio_buffer.speech_started", item_id=self.speech_item,
                           audio_start_ms=int(message.speech_started.at_s * 1000))]
        if kind == "speech_ended":
            ended = message.speech_ended
            item_id = self.speech_item or new_id("item")
            self.speech_item = item_id
            self.requested = True  # the call answers each utterance its VAD ends
            return [_event("input_audio_buffer.speech_stopped", item_id=item_id, audio_end_ms=int(ended.at_s * 1000)),
                    *self.committed(ended.duration_s)]
        turn = getattr(getattr(message, kind), "turn", 0)
        response = self.responses.get(turn)
        if kind in ("text", "audio"):
            events = self._begin(turn) if response is None else []
            response = self.responses[turn]
            ids = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
            if kind == "text":
                response.transcript += message.text.text
                return [*events, _event(self._transcript_delta, delta=message.text.text, **ids)]
            response.chunk_ends_s.append(response.audio_s + message.audio.duration_s)
            return [*events, _event(self._audio_delta, delta=base64.b64encode(message.audio.data).decode(), **ids)]
        if kind == "turn_finished":
            done = message.turn_finished
            events = self._begin(turn) if response is None else []
            response = self.responses[turn]
            if done.text and not response.transcript:
                response.transcript = done.text
            return [*events, *self._finish(response, "completed", self._usage(response, done.text_tokens,
                                                                                done.audio_tokens))]
        if kind == "interrupted":
            if response is None or response.done:  # an answer stored whole, cut later: already done
                return []
            audio_tokens = math.floor(message.interrupted.audio_sent_s * TOKENS_PER_SECOND)
            reason, self.cancelling = "client_cancelled" if self.cancelling else "turn_detected", False
            return self._finish(response, "cancelled", self._usage(response, 0, audio_tokens),
                                {"type": "cancelled", "reason": reason})
        if kind == "error":
            err = message.error
            self.requested = False
            kind = "invalid_request_error" if err.code == 3 else "server_error"  # 3: INVALID_ARGUMENT
            events = [error_event(RealtimeError(err.message, code=f"grpc_{err.code}", error_type=kind))]
            if response is not None and not response.done:
                events += self._finish(response, "failed", self._usage(response, 0, 0), {
                    "type": "failed", "error": {"type": "server_error", "code": f"grpc_{err.code}"}})
            return events
        return []

    def truncate_target(self, item_id: str, audio_end_ms: int, event_id: str | None) -> tuple[Response, int, float]:
        """(response, seq of the chunk playing at audio_end_ms, seconds played) of a truncate."""
        response = self.by_item.get(item_id)
        if response is None:
            raise RealtimeError(f"conversation.item.truncate: no assistant item {item_id[:60]!r} in this "
                                "conversation", code="item_not_found", param="item_id", event_id=event_id)
        played_s = audio_end_ms / 1000
        if played_s > response.audio_s + 0.001:  # 1 ms: the client's rounding of the audio to whole ms
            raise RealtimeError(f"conversation.item.truncate: audio_end_ms {audio_end_ms} is past the item's "
                                f"{response.audio_s * 1000:.0f} ms of audio", param="audio_end_ms",
                                event_id=event_id)
        played_s = min(played_s, response.audio_s)
        seq = next((i for i, end in enumerate(response.chunk_ends_s) if played_s <= end),
                   len(response.chunk_ends_s) - 1)
        return response, max(seq, 0), played_s
