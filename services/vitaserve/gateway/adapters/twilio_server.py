"""The Twilio Media Streams WebSocket endpoint: a thin edge that drives `gateway.call.Call`, the
engine of Converse, in this process (no extra hop), through the servicer's own gate (credentials,
the replica's --max-calls, the tenant's quotas, drain).

One connection is one call: the upgrade (X-Twilio-Signature checked when an auth token is set),
`connected`, `start` within --first-message-s (its customParameters become the CallConfig, its or
the upgrade's credential passes the gate), then `media` as AudioFrames, echoed `mark`s as
PlaybackProgress, `stop` as CANCEL and the end of the caller's messages (the session stays
resumable). The call's audio goes out as `media` + `mark` per chunk, `clear` on barge-in
(gateway/adapters/twilio.py). A call ends with a close frame: 1000 when it ended well, otherwise a
code and reason (gateway/adapters/ws_close.py); nothing else is touched.

With --twilio-preset telnyx the port speaks Telnyx's variant (gateway/adapters/twilio.py): PCMU or
PCMA, no X-Twilio-Signature (Twilio's alone), and the credential may also come as the
x-telnyx-streaming-auth-token header Telnyx sends on the upgrade (set it to one of our API keys);
Telnyx's `error` events are logged and the call goes on.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from contextlib import aclosing
from http import HTTPStatus

import grpc
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from vitaserve.api import conversation_pb2 as pb
from vitaserve.common import metrics
from vitaserve.common.tls import ServerTls
from vitaserve.gateway.adapters import twilio
from vitaserve.gateway.adapters.readiness import http_health
from vitaserve.gateway.adapters.stall import within_stall
from vitaserve.gateway.auth import API_KEY_HEADER, AUTHORIZATION_HEADER
from vitaserve.gateway.adapters.ws_close import (NORMAL, POLICY, ProtocolViolation, close_code, close_reason)
from vitaserve.gateway.call import Call
from vitaserve.gateway.service import edge_status

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Twilio-Signature"
TELNYX_TOKEN_HEADER = "x-telnyx-streaming-auth-token"  # Telnyx's streaming auth token: taken as an API key
CREDENTIAL_HEADERS = (API_KEY_HEADER, AUTHORIZATION_HEADER)  # the names gateway/auth.py reads in gRPC metadata
# The largest message the protocol needs: `start` with a system prompt of at most 4 characters per
# context token (gateway/call.py; 16 Ki characters at 4096 tokens), each up to 6 bytes as a JSON
# \\uXXXX escape, and a credential of <= 8 KiB: 96 KiB + 8 KiB; a `media` of a whole 64 KiB frame is
# 88 KiB of base64. 128 KiB holds either with room for the envelope; larger closes with 1009.
MAX_MESSAGE_BYTES = 128 * 1024


class PeerGone(Exception):
    """The platform closed the socket: the call ends as if cancelled (what was heard is kept)."""


def server_ssl(tls: ServerTls | None) -> ssl.SSLContext | None:
    """wss with the public port's certificate (and its client CA, when it asks for mutual TLS),
    renewed at the next handshake when its files change, as on the gRPC port (common/tls.py)."""
    return None if tls is None else tls.ssl_context()


class TwilioServer:
    def __init__(self, servicer):
        self.servicer = servicer  # gateway.service.ConversationServicer: its gate and its live-call count
        self.deps, self.settings = servicer.deps, servicer.deps.settings
        self.server: Server | None = None
        self.preset = self.settings.twilio_preset
        self.events = _EVENTS | ({"error"} if self.preset == twilio.TELNYX else set())

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def start(self, port: int) -> None:
        self.server = await serve(self._handle, self.settings.host, port, process_request=self._check_signature,
                                  max_size=MAX_MESSAGE_BYTES, ssl=server_ssl(self.settings.tls),
                                  open_timeout=self.settings.first_message_s)
        log.info("twilio media streams serving", port=self.port, preset=self.preset,
                 signature_checked=self._signed)

    @property
    def _signed(self) -> bool:
        return self.settings.twilio_auth_token is not None and self.preset == twilio.TWILIO

    async def stop(self) -> None:
        """Close the listener and every call's socket (1001); their calls end as cancelled."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    # ---- the upgrade ------------------------------------------------------------------------------
    def _check_signature(self, connection: ServerConnection, request):
        health = http_health(self.servicer, connection, request)  # GET /healthz of load balancers
        if health is not None:
            return health
        token = self.settings.twilio_auth_token
        if not self._signed:
            return None
        base = self.settings.twilio_public_url or f"wss://{request.headers.get('Host', '')}"
        signature = request.headers.get(SIGNATURE_HEADER)
        if signature and twilio.signature_valid(token, base + request.path, signature):
            return None
        log.info("twilio upgrade refused: bad signature", signed=bool(signature))
        metrics.GATEWAY_ERRORS.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc()
        return connection.respond(HTTPStatus.FORBIDDEN, f"{SIGNATURE_HEADER} missing or not valid for this URL\n")

    # ---- one call ---------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        code, reason = NORMAL, "call ended"
        try:
            start = await self._until_start(ws)
            if start is None:
                return await ws.close(NORMAL, "stop before start")
            headers = tuple((name, value) for name in CREDENTIAL_HEADERS for value in ws.request.headers.get_all(name))
            if self.preset == twilio.TELNYX:
                headers += tuple((API_KEY_HEADER, v) for v in ws.request.headers.get_all(TELNYX_TOKEN_HEADER))
            async with self.servicer.call_slot(headers + start.credentials, "converse") as caller:
                with self.servicer.live_call(), metrics.GATEWAY_ADAPTER_CALLS.labels(self.preset).track_inprogress():
                    log.info("twilio stream started", stream_sid=start.stream_sid, call_sid=start.call_sid,
                             tenant=caller.tenant)
                    await self._converse(ws, start, caller.tenant)
        except PeerGone:
            return
        except ProtocolViolation as exc:
            metrics.GATEWAY_ERRORS.labels(grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            code, reason = exc.code, str(exc)
        except Exception as exc:
            status, reason = edge_status(exc)
            metrics.GATEWAY_ERRORS.labels(status.name).inc()
            code, reason = close_code(status), f"{status.name}: {reason}"
        if code != NORMAL:
            log.info("twilio stream closed", code=code, reason=reason)
        await ws.close(code, close_reason(reason))

    async def _until_start(self, ws: ServerConnection) -> twilio.StreamStart | None:
        """The `start` event (after an optional `connected`); None when `stop` came first."""
        try:
            async with asyncio.timeout(self.settings.first_message_s):
                while True:
                    event, message = twilio.parse_event(await _recv(ws))
                    if event == "start":
                        return twilio.parse_start(message, self.preset)
                    if event == "stop":
                        return None
                    if event == "error" and event in self.events:
                        log.warning("telnyx error event", error=twilio.error_description(message))
                        continue
                    if event != "connected":
                        raise ProtocolViolation(POLICY, f"`{event}` before `start`" if event in self.events
                                                else f"unknown event {event[:40]!r}")
        except TimeoutError:
            metrics.GATEWAY_CALL_LIMITS.labels("first_message").inc()
            raise ProtocolViolation(POLICY, f"no `start` within {self.settings.first_message_s:g} s") from None

    async def _converse(self, ws: ServerConnection, start: twilio.StreamStart, tenant: str) -> None:
        playback = twilio.Playback()
        sid = start.stream_sid

        async def requests():
            yield start.config
            while True:
                frame = await _recv(ws)
                received = time.perf_counter()
                event, message = twilio.parse_event(frame)
                if event == "media":
                    audio = twilio.media_payload(message)
                    if audio is not None:
                        request = pb.ConverseRequest(audio=pb.AudioFrame(data=audio))
                        metrics.GATEWAY_ADAPTER_MS.labels(self.preset, "in").observe(
                            (time.perf_counter() - received) * 1000)  # parsed and decoded: handed over next
                        yield request
                elif event == "mark":
                    report = playback.echoed(twilio.mark_name(message))
                    if report is not None:
                        yield report
                elif event == "dtmf":  # no call control rides on digits yet
                    log.info("twilio dtmf ignored", digit=twilio.dtmf_digit(message)[:1])
                elif event == "stop":  # the call is over: cut the answer at what was heard, keep the session
                    yield pb.ConverseRequest(control=pb.Control(action=pb.Control.CANCEL))
                    return
                elif event == "error" and event in self.events:  # Telnyx's: logged, the call goes on
                    log.warning("telnyx error event", error=twilio.error_description(message))
                elif event in self.events:
                    raise ProtocolViolation(POLICY, f"`{event}` after `start`")
                else:
                    raise ProtocolViolation(POLICY, f"unknown event {event[:40]!r}")

        async with aclosing(Call(self.deps, tenant).run(requests())) as messages:
            async for message in messages:
                started = time.perf_counter()
                for out in _events(message, sid, playback, self.preset):
                    await self._send(ws, out)
                if message.WhichOneof("message") == "audio":
                    metrics.GATEWAY_ADAPTER_MS.labels(self.preset, "out").observe((time.perf_counter() - started) * 1000)

    async def _send(self, ws: ServerConnection, text: str) -> None:
        """One event out; a platform that takes nothing for --max-reader-stall-s ends its call, as
        on Converse (the socket's write buffer and the call's Outbox hold the answer back till then)."""
        try:
            await within_stall(ws.send(text), self.settings.max_reader_stall_s, "the platform")
        except ConnectionClosed:
            raise PeerGone() from None


_EVENTS = frozenset({"connected", "start", "media", "dtmf", "mark", "stop"})


async def _recv(ws: ServerConnection) -> str | bytes:
    try:
        return await ws.recv()
    except ConnectionClosed:
        raise PeerGone() from None


def _events(message: pb.ConverseResponse, sid: str, playback: twilio.Playback,
            preset: str = twilio.TWILIO) -> list[str]:
    """The Twilio events one message of the call becomes (most become none: Twilio carries audio only)."""
    kind = message.WhichOneof("message")
    if kind == "audio":
        return [twilio.media_event(sid, message.audio.data, preset),
                twilio.mark_event(sid, playback.sent(message.audio), preset)]
    if kind == "interrupted" or (kind == "speech_started" and playback.playing):
        playback.cleared()  # barge-in, or the caller talks over audio still playing at the platform
        return [twilio.clear_event(sid, preset)]
    if kind == "error":
        log.warning("turn failed", turn=message.error.turn, code=message.error.code, error=message.error.message)
        return [twilio.mark_event(sid, playback.turn_ended(message.error.turn), preset)] if message.error.turn else []
    if kind == "turn_finished":
        return [twilio.mark_event(sid, playback.turn_ended(message.turn_finished.turn), preset)]
    return []
