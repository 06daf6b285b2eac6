"""The Asterisk AudioSocket TCP endpoint: a thin edge that drives `gateway.call.Call`, the engine of
Converse, in this process (no extra hop), through the servicer's own gate (credentials, the
replica's --max-calls, the tenant's quotas, drain).

One connection is one call: the UUID frame within --first-message-s names the session (created
with that id the first time, resumed after), then 8 kHz slin audio frames go to the call, DTMF is
logged, a hang-up frame or an error frame from Asterisk ends the call (CANCEL: the answer is cut at
what was heard, the session stays resumable). The call's audio comes back paced in real time
(gateway/adapters/audiosocket.py `Pacer`), and what was released is reported to the call as
PlaybackProgress. A failure is answered with an error frame (the gRPC status code and the reason),
then the socket closes; nothing else is touched.

Who may call: AudioSocket carries no credential. Every call on this port presents the API key in
$VITA_AUDIOSOCKET_API_KEY (or the file named by $VITA_AUDIOSOCKET_API_KEY_FILE) to the gate, so its
tenant, scopes and quotas apply; without it calls are anonymous and pass only with
--allow-anonymous. The port is plaintext TCP (Asterisk speaks no TLS on AudioSocket): keep it
internal, reachable from the PBX alone (a NetworkPolicy, a private network), never public.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import NamedTuple

import grpc
import structlog

from vitaserve.api import conversation_pb2 as pb
from vitaserve.common import metrics
from vitaserve.common.session_store import SessionConfig, SessionExists
from vitaserve.gateway.adapters import audiosocket as wire
from vitaserve.gateway.adapters.audiosocket import AudioSocketError
from vitaserve.gateway.adapters.stall import within_stall
from vitaserve.gateway.auth import API_KEY_HEADER
from vitaserve.gateway.call import Call
from vitaserve.gateway.codecs import PCM16
from vitaserve.gateway.service import edge_status
from vitaserve.lmtext.prompt import LUKE_SYSTEM

log = structlog.get_logger(__name__)

PROTOCOL = "audiosocket"
READ_BYTES = 16 * 1024
# Messages to the call: caller audio (50 a second) and playback reports (12.5 a second). The reader
# waits when the call is this far behind, so the socket's own buffer holds the rest.
MAX_REQUESTS = 64
RECENT_BARGE_INS = 64  # barge-ins kept for tests and debugging


class BargeIn(NamedTuple):
    """One barge-in that dropped waiting audio, on the pacer's clocks."""
    session_id: str
    at: float          # time.perf_counter() when the adapter dropped the audio
    dropped_s: float   # audio that never left
    released_s: float  # the turn's audio released before it: the caller gets exactly this
    playing_s: float   # of that, what the play clock had not reached: it still plays (<= OUT_QUEUE_S)


class PeerGone(Exception):
    """Asterisk closed the socket: the call ends as if cancelled (what was heard is kept)."""


class AudioSocketServer:
    def __init__(self, servicer):
        self.servicer = servicer  # gateway.service.ConversationServicer: its gate and its live-call count
        self.deps, self.settings = servicer.deps, servicer.deps.settings
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task] = set()
        self.pacers: dict[str, wire.Pacer] = {}  # each live call's outgoing audio, by session id
        # barge-ins that dropped waiting audio, most recent last
        self.barge_ins: collections.deque[BargeIn] = collections.deque(maxlen=RECENT_BARGE_INS)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def credentials(self) -> tuple[tuple[str, str], ...]:
        key = self.settings.audiosocket_api_key
        return ((API_KEY_HEADER, key),) if key else ()

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._connection, self.settings.host, port)
        log.info("asterisk audiosocket serving", port=self.port, api_key=bool(self.settings.audiosocket_api_key))

    async def stop(self) -> None:
        """Close the listener and every call's socket; their calls end as cancelled."""
        if self.server is not None:
            self.server.close()
            for task in list(self.connections):
                task.cancel()
            await asyncio.gather(*self.connections, return_exceptions=True)
            await self.server.wait_closed()

    # ---- one call ---------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        metrics.GATEWAY_ADAPTER_CALLS.labels(PROTOCOL).inc()
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:  # the gateway stops: the call ends as if Asterisk hung up
            pass
        finally:
            metrics.GATEWAY_ADAPTER_CALLS.labels(PROTOCOL).dec()
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = wire.FrameParser()
        frames: collections.deque[wire.Frame] = collections.deque()
        try:
            uuid = await self._until_uuid(reader, parser, frames)
            if uuid is None:
                return
            sid = wire.session_id(uuid)
            async with self.servicer.call_slot(self.credentials, "converse") as caller:
                with self.servicer.live_call():
                    log.info("audiosocket stream started", session_id=sid, tenant=caller.tenant)
                    await self._open_session(sid, caller.tenant)
                    await self._converse(reader, writer, parser, frames, sid, caller.tenant)
            return  # it ended with Asterisk's hang-up: nothing to answer
        except PeerGone:
            return
        except AudioSocketError as exc:
            status, reason = exc.status, str(exc)
        except Exception as exc:
            status, reason = edge_status(exc)
        metrics.GATEWAY_ERRORS.labels(status.name).inc()
        log.info("audiosocket stream closed", status=status.name, reason=reason)
        with contextlib.suppress(Exception):
            writer.write(wire.error_frame(status, f"{status.name}: {reason}"))
            await _drain(writer, 1.0)

    async def _until_uuid(self, reader, parser: wire.FrameParser, frames) -> bytes | None:
        """The UUID frame, first; None when Asterisk hangs up (or closes) before it."""
        try:
            async with asyncio.timeout(self.settings.first_message_s):
                while not frames:
                    data = await reader.read(READ_BYTES)
                    if not data:
                        return None
                    frames.extend(parser.feed(data))
        except TimeoutError:
            metrics.GATEWAY_CALL_LIMITS.labels("first_message").inc()
            raise AudioSocketError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"no UUID frame within {self.settings.first_message_s:g} s") from None
        first = frames.popleft()
        if first.kind == wire.KIND_HANGUP:
            return None
        if first.kind != wire.KIND_UUID:
            raise AudioSocketError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"{wire.KIND_NAMES[first.kind]} frame before the UUID frame: the UUID comes first")
        return first.payload

    async def _open_session(self, sid: str, tenant: str) -> None:
        """The session the UUID names: created with that id the first time (the call then resumes it,
        the one way a call opens a session of a chosen id)."""
        store = self.deps.store
        if await store.get(sid) is not None:
            return
        with contextlib.suppress(SessionExists):  # another connection of the same UUID made it first
            await store.create(SessionConfig(mode=self.settings.default_mode, codec=PCM16,
                                             sample_rate=wire.SAMPLE_RATE, system_prompt=LUKE_SYSTEM),
                               tenant=tenant, session_id=sid)

    async def _converse(self, reader, writer, parser, frames, sid: str, tenant: str) -> None:
        requests_q: asyncio.Queue = asyncio.Queue(MAX_REQUESTS)
        pacer = self.pacers[sid] = wire.Pacer()
        more_audio, room = asyncio.Event(), asyncio.Event()
        config = pb.ConverseRequest(config=pb.CallConfig(input_format=wire.PCM16_8K, output_format=wire.PCM16_8K,
                                                         session_id=sid))

        async def read_socket() -> None:
            """Asterisk's frames -> the call's messages; ends the requests with None (or an error)."""
            try:
                while True:
                    while frames:
                        started = time.perf_counter()
                        message = _request(frames.popleft(), sid)
                        if message is None:  # hang-up or Asterisk's error: cut at what was heard
                            await requests_q.put(pb.ConverseRequest(control=pb.Control(action=pb.Control.CANCEL)))
                            await requests_q.put(None)
                            return
                        if message.WhichOneof("message"):
                            await requests_q.put(message)
                            metrics.GATEWAY_ADAPTER_MS.labels(PROTOCOL, "in").observe(
                                (time.perf_counter() - started) * 1000)
                    data = await reader.read(READ_BYTES)
                    if not data:
                        raise PeerGone() if not parser.partial else AudioSocketError(
                            grpc.StatusCode.INVALID_ARGUMENT, "the socket closed in the middle of a frame")
                    frames.extend(parser.feed(data))
            except (PeerGone, AudioSocketError, ConnectionError) as exc:
                await requests_q.put(PeerGone() if isinstance(exc, ConnectionError) else exc)

        async def requests():
            yield config
            while True:
                item = await requests_q.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item

        async def pace() -> None:
            """Release the answer's audio in real time; report what was released to the call."""
            loop = asyncio.get_running_loop()
            reported = (0, -1.0)
            while True:
                wait = pacer.next_due(loop.time())
                if wait is None:
                    more_audio.clear()
                    await more_audio.wait()
                    continue
                if wait > 0:
                    await asyncio.sleep(wait)
                out = pacer.due(loop.time())
                if not out:
                    continue
                started = time.perf_counter()
                writer.write(b"".join(wire.frame(wire.KIND_AUDIO, data) for data in out))
                if not pacer.full:
                    room.set()
                progress = pacer.progress()
                turn, played = progress.playback.turn, progress.playback.played_s
                if (turn, played) != reported and (turn != reported[0] or played - reported[1] >= wire.REPORT_EVERY_S
                                                   or not pacer.pending_bytes):
                    with contextlib.suppress(asyncio.QueueFull):  # a later report says more
                        requests_q.put_nowait(progress)
                        reported = (turn, played)
                metrics.GATEWAY_ADAPTER_MS.labels(PROTOCOL, "out").observe((time.perf_counter() - started) * 1000)
                await _drain(writer, self.settings.max_reader_stall_s)

        reading, pacing = asyncio.create_task(read_socket()), asyncio.create_task(pace())
        answering = asyncio.create_task(self._answer(Call(self.deps, tenant).run(requests()), pacer, more_audio,
                                                     room, sid))
        try:  # the call ends when its messages end, or when the pacer cannot write (Asterisk gone or stalled)
            await asyncio.wait({answering, pacing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.pacers.pop(sid, None)
            for task in (answering, pacing, reading):
                task.cancel()
            await asyncio.gather(answering, pacing, reading, return_exceptions=True)
        for task in (answering, pacing):
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def _answer(self, messages, pacer: wire.Pacer, more_audio, room, sid: str) -> None:
        """The call's messages: audio to the pacer; a barge-in drops what it has not released."""
        async with contextlib.aclosing(messages):
            async for message in messages:
                kind = message.WhichOneof("message")
                if kind == "audio":
                    pacer.add(message.audio)
                    more_audio.set()
                    while pacer.full:  # past one answer's worth: wait for the pacer
                        room.clear()
                        await room.wait()
                elif kind in ("interrupted", "speech_started") and pacer.pending_bytes:
                    dropped = pacer.clear()  # what was released plays on: at most OUT_QUEUE_S
                    playing = pacer.queued_s(asyncio.get_running_loop().time())
                    self.barge_ins.append(BargeIn(sid, time.perf_counter(), dropped, pacer.turn_released_s, playing))
                    log.info("audiosocket barge-in", dropped_s=round(dropped, 3), playing_s=round(playing, 3),
                             turn=pacer.turn)
                elif kind == "error":
                    log.warning("turn failed", turn=message.error.turn, code=message.error.code,
                                error=message.error.message)


def _request(frame: wire.Frame, sid: str) -> pb.ConverseRequest | None:
    """The call's message for one frame of Asterisk's: an empty one for frames that carry nothing
    for the call, None for those that end it."""
    if frame.kind == wire.KIND_AUDIO:
        return pb.ConverseRequest(audio=pb.AudioFrame(data=frame.payload))
    if frame.kind == wire.KIND_DTMF:  # no call control rides on digits yet
        log.info("audiosocket dtmf ignored", digit=wire.dtmf_digit(frame.payload))
        return pb.ConverseRequest()
    if frame.kind == wire.KIND_HANGUP:
        return None
    if frame.kind == wire.KIND_ERROR:
        log.warning("asterisk sent an error frame: the call ends", error=wire.asterisk_error(frame.payload))
        return None
    raise AudioSocketError(grpc.StatusCode.INVALID_ARGUMENT, "a second UUID frame: the UUID comes once, first")


async def _drain(writer: asyncio.StreamWriter, stall_s: float) -> None:
    """Wait until the socket takes what was written; Asterisk reading nothing for --max-reader-stall-s
    ends the call, as on Converse."""
    try:
        await within_stall(writer.drain(), stall_s, "Asterisk")
    except ConnectionError:
        raise PeerGone() from None


