"""A scripted caller of Converse for tests: the script puts messages in `outbox` (None half-closes),
`speak()` paces audio as a caller talks, and every server message is recorded and announced.

Unlike `client.phone.run_call`, which plays whole turns and measures them, a script decides each
step itself (talk over an answer, hang up mid-turn, send a second config) and waits on events:
`event("audio")`, `event("turn_finished:2")`, one per message kind (and per finished turn).
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from vitaserve.api import conversation_pb2 as pb, conversation_pb2_grpc
from vitaserve.common.channel_options import caller_options
from vitaserve.common.tls import ClientTls, secure_or_insecure_channel
from vitaserve.gateway.codecs import encode_audio

FRAME_S = 0.02
LEAD_S = 0.2  # silence before the speech, at most the trailing silence


class ScriptedPhone:
    """Run `run()` as a task; it returns the call's status code (`error` holds the RpcError)."""

    def __init__(self, target: str, codec: str = "mulaw", rate: int = 8000, tls: ClientTls | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()):
        self.codec, self.rate = codec, rate
        self.metadata = metadata  # the caller's credentials: (("x-api-key", key),) or (("authorization", "Bearer ..."),)
        self.channel = secure_or_insecure_channel(target, tls, caller_options())
        self.stub = conversation_pb2_grpc.ConversationStub(self.channel)
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.messages: list[pb.ConverseResponse] = []
        self.events: dict[str, asyncio.Event] = {}
        self.error: grpc.aio.AioRpcError | None = None

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def _requests(self):
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def run(self) -> grpc.StatusCode:
        call = self.stub.Converse(self._requests(), metadata=self.metadata or None)
        try:
            async for msg in call:
                self.messages.append(msg)
                kind = msg.WhichOneof("message")
                self.event(kind).set()
                if kind == "turn_finished":
                    self.event(f"turn_finished:{msg.turn_finished.turn}").set()
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            self.error = exc
            return exc.code()
        finally:
            await self.channel.close()

    def frames(self, samples: np.ndarray) -> list[bytes]:
        """20 ms frames of float samples at the call's rate, in its codec."""
        n = int(self.rate * FRAME_S)
        return [encode_audio(samples[i : i + n], self.codec, self.rate) for i in range(0, len(samples), n)]

    async def speak(self, samples: np.ndarray, silence_s: float = 1.0, realtime: float = 1.0) -> None:
        """A short lead of silence, the samples, `silence_s` of silence; one frame per 20 ms / realtime."""
        pad = np.zeros(int(silence_s * self.rate), np.float32)
        for frame in self.frames(np.concatenate([pad[: int(LEAD_S * self.rate)], samples, pad])):
            await self.outbox.put(pb.ConverseRequest(audio=pb.AudioFrame(data=frame)))
            await asyncio.sleep(FRAME_S / realtime)

    async def control(self, action) -> None:
        await self.outbox.put(pb.ConverseRequest(control=pb.Control(action=action)))

    def of(self, kind: str) -> list:
        """The payloads of every received message of one kind, in order."""
        return [getattr(m, kind) for m in self.messages if m.WhichOneof("message") == kind]
