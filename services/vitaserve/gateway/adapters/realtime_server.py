"""The OpenAI Realtime WebSocket endpoint: a thin edge that drives `gateway.call.Call`, the engine of
Converse, in this process (no extra hop), through the servicer's own gate (credentials, the
replica's --max-calls, the tenant's quotas, drain).

One connection is one call. The upgrade's `Authorization: Bearer <key>` (what the `openai` SDK
sends) passes the gate before anything else; then `session.created`. `session.update`s before the
first audio shape the call (formats, server VAD or push-to-talk, instructions); the first
`input_audio_buffer.append` opens it (the CallConfig). Under server VAD audio goes straight to the
call, which answers each utterance; with `turn_detection: null` the adapter keeps the input buffer
(commit / clear are the protocol's own) and hands a committed buffer to the call at
`response.create` (AudioFrames, then END_OF_UTTERANCE). A later `session.update` that changes the
call's config hands over: the answer under way is cancelled, the call ends, and a new one resumes
its session (history kept) with the new config on the same socket. `response.cancel` is CANCEL;
`conversation.item.truncate` is a PlaybackProgress + CANCEL for the answer being generated, or
Call.cut_to_heard for the last stored one. Query parameters of the URL: `session_id` resumes a
session (started over any protocol), `mode` picks the generation mode; `model` is accepted.

Client mistakes the protocol continues after are `error` events (gateway/adapters/realtime.py);
what ends the call (a refused credential, a call limit, the store down) is an `error` event and then
a close code and reason (gateway/adapters/ws_close.py). A client that goes away ends its call as
cancelled; the session stays resumable.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from functools import partial
from urllib.parse import parse_qs, urlsplit

import grpc
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from vitaserve.api import conversation_pb2 as pb
from vitaserve.common import metrics
from vitaserve.gateway.adapters import realtime as rt
from vitaserve.gateway.adapters.readiness import http_health
from vitaserve.gateway.adapters.stall import within_stall
from vitaserve.gateway.adapters.twilio_server import server_ssl
from vitaserve.gateway.adapters.ws_close import NORMAL, POLICY, close_code, close_reason
from vitaserve.gateway.call import Call
from vitaserve.gateway.convert import CallError
from vitaserve.gateway.service import edge_status

log = structlog.get_logger(__name__)

PROTOCOL = "realtime"
DEFAULT_MODEL = "vita-audio"


class PeerGone(Exception):
    """The client closed the socket: the call ends as if cancelled (what was sent is kept)."""


class RealtimeServer:
    def __init__(self, servicer):
        self.servicer = servicer  # gateway.service.ConversationServicer: its gate and its live-call count
        self.deps, self.settings = servicer.deps, servicer.deps.settings
        self.server: Server | None = None

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def start(self, port: int) -> None:
        self.server = await serve(self._handle, self.settings.host, port, max_size=rt.MAX_MESSAGE_BYTES,
                                  ssl=server_ssl(self.settings.tls), open_timeout=self.settings.first_message_s,
                                  process_request=partial(http_health, self.servicer))  # GET /healthz
        log.info("openai realtime serving", port=self.port)

    async def stop(self) -> None:
        """Close the listener and every call's socket (1001); their calls end as cancelled."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        gauge = metrics.GATEWAY_ADAPTER_CALLS.labels(PROTOCOL)
        gauge.inc()
        try:
            await Connection(self, ws).run()
        finally:
            gauge.dec()


class Connection:
    """One client connection: its settings, its input buffer (push-to-talk) and its call."""

    def __init__(self, server: RealtimeServer, ws: ServerConnection):
        self.server, self.ws, self.settings = server, ws, server.settings
        headers = ws.request.headers
        self.schema = rt.schema_of(headers)
        self.credentials = rt.credentials_of(headers)
        query = {k: v[-1] for k, v in parse_qs(urlsplit(ws.request.path).query).items()}
        self.model, self.mode = query.get("model", DEFAULT_MODEL)[:100], query.get("mode", "")
        self.resume_id = query.get("session_id", "")
        self.session = rt.SessionSettings()
        self.session_id = rt.new_id("sess")
        self.translator = rt.Translator(self.schema)
        self.call: Call | None = None
        self.call_wanted = False           # audio arrived: the call opens
        self.handover = False              # a session.update changed the call's config: a new call goes on
        self.buffer: list[bytes] = []      # push-to-talk: appended since the last commit or clear
        self.committed: list[bytes] = []   # push-to-talk: committed, handed to the call at response.create
        self.send_lock = asyncio.Lock()    # the reader's and the call's events go out one at a time

    async def run(self) -> None:
        code, reason = NORMAL, "call ended"
        try:
            async with self.server.servicer.call_slot(self.credentials, "converse") as caller:
                with self.server.servicer.live_call():
                    await self._send(rt._event("session.created", session=self._session_object()))
                    first = await self._until_audio()
                    log.info("realtime call opened", tenant=caller.tenant, schema=self.schema)
                    await self._converse(first, caller.tenant)
        except PeerGone:
            return
        except Exception as exc:
            status, message = edge_status(exc)
            metrics.GATEWAY_ERRORS.labels(status.name).inc()
            code, reason = close_code(status), f"{status.name}: {message}"
            if code != NORMAL:
                await self._try_send(rt.error_event(rt.RealtimeError(
                    reason, code=status.name.lower(),
                    error_type="invalid_request_error" if code == POLICY else "server_error")))
        if code != NORMAL:
            log.info("realtime connection closed", code=code, reason=reason)
        await self.ws.close(code, close_reason(reason))

    def _session_object(self) -> dict:
        return self.session.as_session(self.schema, self.session_id, self.model)

    # ---- before the call: session.update until the first audio ------------------------------------
    async def _until_audio(self) -> list[pb.ConverseRequest]:
        """The client's events until the first append (which opens the call: its requests)."""
        try:
            async with asyncio.timeout(self.settings.idle_s):
                while True:
                    requests = [r async for r in self._requests_of(await self._recv())]
                    if self.call_wanted:
                        return requests
        except TimeoutError:
            metrics.GATEWAY_CALL_LIMITS.labels("idle").inc()
            raise CallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no audio within {self.settings.idle_s:g} s of connecting") from None

    # ---- the call -------------------------------------------------------------------------------------
    async def _converse(self, first: list[pb.ConverseRequest], tenant: str) -> None:
        """The call, until the client goes or the call fails. A session.update that changes the call's
        config hands over: this call's requests end (its answer cancelled), and a new call resumes its
        session with the new config, on the same socket."""
        session_id = self.resume_id
        observe = metrics.GATEWAY_ADAPTER_MS.labels(PROTOCOL, "out").observe
        while True:
            self.call = call = Call(self.server.deps, tenant)
            self.handover = False
            config = self.session.call_config(self.mode, session_id)

            async def requests():
                yield config
                for request in first:
                    yield request
                while not self.handover:
                    async for request in self._requests_of(await self._recv()):
                        yield request

            async with aclosing(call.run(requests())) as messages:
                async for message in messages:
                    t = time.perf_counter()
                    for event in self.translator.events(message):
                        await self._send(event)
                    observe((time.perf_counter() - t) * 1000)
            if not self.handover:
                return
            session_id, first = call.session_id, []
            log.info("realtime call handed over to new settings")

    async def _requests_of(self, data: str | bytes):
        """The call's requests one client frame becomes; the events the adapter answers itself go
        out here (in order: what this yields is processed by the call before the next frame is read)."""
        t = time.perf_counter()
        observe = metrics.GATEWAY_ADAPTER_MS.labels(PROTOCOL, "in").observe
        try:
            kind, event = rt.parse_event(data)
            async for request in self._on_event(kind, event, rt._id(event.get("event_id"))):
                observe((time.perf_counter() - t) * 1000)
                yield request
                t = time.perf_counter()
        except rt.RealtimeError as exc:
            metrics.GATEWAY_ERRORS.labels(grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await self._send(rt.error_event(exc))

    async def _on_event(self, kind: str, event: dict, event_id: str | None):
        session = self.session
        if kind == "session.update":
            updated = rt.SessionSettings(**{**session.__dict__})
            updated.update(event.get("session"), self.schema, event_id)
            self.session = updated
            await self._send(rt._event("session.updated", session=self._session_object()))
            if self.call is not None and not updated.same_call(session):  # hand over (see _converse)
                self.handover = True
                self.translator.cancelling = self.translator.active is not None
                self.translator.requested = False
                if updated.input_format != session.input_format:  # held audio would not decode any more
                    self.buffer, self.committed = [], []
                yield pb.ConverseRequest(control=pb.Control(action=pb.Control.CANCEL))
        elif kind == "input_audio_buffer.append":
            fmt = rt.GA_FORMATS[session.input_format]
            data = rt.appended_audio(event, fmt)
            self.call_wanted = True
            if session.push_to_talk:
                held = sum(map(len, self.buffer)) + len(data)
                limit = int(self.settings.max_utterance_s * rt.BYTES_PER_SECOND[fmt.codec])
                if held > limit:
                    raise rt.RealtimeError(f"the input audio buffer would hold more than "
                                           f"{self.settings.max_utterance_s:g} s: commit it first",
                                           code="input_audio_buffer_full", event_id=event_id)
                self.buffer.append(data)
            else:
                for piece in self._frames(data):
                    yield piece
        elif kind == "input_audio_buffer.commit":
            if session.push_to_talk:
                fmt = rt.GA_FORMATS[session.input_format]
                seconds = sum(map(len, self.buffer)) / rt.BYTES_PER_SECOND[fmt.codec]
                if seconds < rt.MIN_COMMIT_S:
                    raise rt.RealtimeError(f"input audio buffer holds {seconds * 1000:.0f} ms: commit at least "
                                           f"{rt.MIN_COMMIT_S * 1000:.0f} ms of audio",
                                           code="input_audio_buffer_commit_empty", event_id=event_id)
                self.committed += self.buffer
                self.buffer = []
                for out in self.translator.committed(seconds):
                    await self._send(out)
            else:
                self._need_call("input_audio_buffer.commit", event_id)
                for out in self.translator.committed(0.0):
                    await self._send(out)
                self.translator.requested = True
                yield pb.ConverseRequest(control=pb.Control(action=pb.Control.END_OF_UTTERANCE))
        elif kind == "input_audio_buffer.clear":
            if not session.push_to_talk:
                raise rt.RealtimeError("input_audio_buffer.clear: with server_vad the server segments the audio "
                                       "itself; clear is for turn_detection null", code="not_supported_with_vad",
                                       event_id=event_id)
            self.buffer = []
            for out in self.translator.cleared():
                await self._send(out)
        elif kind == "response.create":
            if self.translator.active is not None or self.translator.requested:
                raise rt.RealtimeError("a response is already in progress: cancel it first",
                                       code="conversation_already_has_active_response", event_id=event_id)
            if not session.push_to_talk:
                raise rt.RealtimeError("with server_vad the server creates a response at the end of each "
                                       "utterance; response.create is for turn_detection null",
                                       code="not_supported_with_vad", event_id=event_id)
            if not self.committed:
                raise rt.RealtimeError("response.create: no committed input audio to answer "
                                       "(input_audio_buffer.commit first)", code="no_input", event_id=event_id)
            self._need_call("response.create", event_id)
            data, self.committed = b"".join(self.committed), []
            for piece in self._frames(data):
                yield piece
            self.translator.requested = True
            yield pb.ConverseRequest(control=pb.Control(action=pb.Control.END_OF_UTTERANCE))
        elif kind == "response.cancel":
            if self.translator.active is None and not self.translator.requested:
                raise rt.RealtimeError("there is no response in progress to cancel",
                                       code="response_cancel_not_active", event_id=event_id)
            # an answer not begun yet is dropped without a word (no response.created went out for it)
            self.translator.cancelling, self.translator.requested = self.translator.active is not None, False
            yield pb.ConverseRequest(control=pb.Control(action=pb.Control.CANCEL))
        elif kind == "conversation.item.truncate":
            item_id, end_ms = rt.truncate_args(event)
            response, seq, played_s = self.translator.truncate_target(item_id, end_ms, event_id)
            if not response.done:  # being generated: the caller stopped playing it there
                self.translator.cancelling = True
                yield pb.ConverseRequest(playback=pb.PlaybackProgress(turn=response.turn, seq=seq, played_s=played_s))
                yield pb.ConverseRequest(control=pb.Control(action=pb.Control.CANCEL))
            else:
                problem = await self.call.cut_to_heard(response.turn, played_s)
                if problem is not None:
                    raise rt.RealtimeError(f"conversation.item.truncate: {problem}", code="truncate_failed",
                                           param="item_id", event_id=event_id)
            for out in self.translator.truncated(item_id, end_ms):
                await self._send(out)

    def _need_call(self, what: str, event_id: str | None) -> None:
        if self.call is None and not self.call_wanted:
            raise rt.RealtimeError(f"{what}: no audio was appended yet", code="input_audio_buffer_commit_empty",
                                   event_id=event_id)

    def _frames(self, data: bytes):
        """AudioFrames of at most --max-frame-bytes (even: whole 16-bit samples)."""
        step = self.settings.max_frame_bytes & ~1
        for i in range(0, len(data), step):
            yield pb.ConverseRequest(audio=pb.AudioFrame(data=data[i:i + step]))

    # ---- the socket ---------------------------------------------------------------------------------
    async def _recv(self) -> str | bytes:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            raise PeerGone() from None

    async def _send(self, event: dict) -> None:
        """One event out; a client that takes nothing for --max-reader-stall-s ends its call, as on
        Converse (the socket's write buffer and the call's Outbox hold the answer back till then)."""
        text = json.dumps(event)
        try:
            async with self.send_lock:
                await within_stall(self.ws.send(text), self.settings.max_reader_stall_s, "the client")
        except ConnectionClosed:
            raise PeerGone() from None

    async def _try_send(self, event: dict) -> None:
        try:
            await self._send(event)
        except (PeerGone, CallError):
            pass


