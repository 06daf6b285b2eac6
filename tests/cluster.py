"""An in-process cluster for integration tests: encoder, two decoder replicas and two gateway replicas
as real gRPC servers on localhost ports, on one background event loop; real Redis and real Triton
come from tests/servers.py. Decoder replicas can be killed to test failover.
"""

from __future__ import annotations

import asyncio
import threading

from vitaserve.api import conversation_pb2_grpc, decoder_pb2_grpc, encoder_pb2_grpc
from vitaserve.common.grpc_server import ServiceRunner, make_server


TRITON_MAX_LEN = 1024  # servers.triton_server's default context


class InProcessCluster:
    def __init__(self, ckpt, redis_url: str, triton_grpc: str, deterministic_decoder: bool = True):
        self.ckpt, self.redis_url, self.triton_grpc = ckpt, redis_url, triton_grpc
        self.deterministic = deterministic_decoder
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.decoders: list[ServiceRunner] = []
        self.gateways: list[ServiceRunner] = []
        self.servicers = []

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "InProcessCluster":
        self.thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        from vitaserve.decoder.audio_decoder import AudioDecoder
        from vitaserve.encoder.service import EncoderServicer
        from vitaserve.encoder.tokenizer import SpeechTokenizer

        tokenizer = await asyncio.to_thread(SpeechTokenizer.from_pretrained, str(self.ckpt / "tokenizer"))
        encoder = EncoderServicer(tokenizer)
        server = make_server()
        encoder_pb2_grpc.add_EncoderServicer_to_server(encoder, server)
        self.encoder = ServiceRunner(server, ["vita.audio.v1.Encoder"], 0, host="127.0.0.1", batchers=[encoder.batcher])
        await self.encoder.start()
        self.decoder_model = await asyncio.to_thread(AudioDecoder.from_pretrained, str(self.ckpt / "decoder"))
        for _ in range(2):
            self.decoders.append(await self.start_decoder())
        decoder_target = "ipv4:" + ",".join(f"127.0.0.1:{d.port}" for d in self.decoders)
        for i in range(2):
            runner, servicer = await self.start_gateway(decoder_target, replica_id=f"gw{i}")
            self.gateways.append(runner)
            self.servicers.append(servicer)

    async def start_decoder(self, port: int = 0) -> ServiceRunner:
        """One more decoder replica (its runner is the caller's to stop)."""
        from vitaserve.common.session_store import SessionStore, connect_redis
        from vitaserve.decoder.service import DecoderServicer

        store = SessionStore(connect_redis(self.redis_url))
        server = make_server(16 * 1024 * 1024)
        servicer = DecoderServicer(self.decoder_model, store, deterministic=self.deterministic)
        decoder_pb2_grpc.add_DecoderServicer_to_server(servicer, server)
        runner = ServiceRunner(server, ["vita.audio.v1.Decoder"], port, host="127.0.0.1", batchers=[servicer.batcher])
        await runner.start()
        return runner

    async def start_gateway(self, decoder_target: str, **config):
        """One more gateway replica talking to `decoder_target`: (runner, servicer)."""
        from vitaserve.gateway.config import GatewayConfig
        from vitaserve.gateway.service import ConversationServicer, build_deps

        config = {"default_mode": "boost", "replica_id": "gw-extra", "max_utterance_s": 8.0,
                  "context_tokens": TRITON_MAX_LEN, **config}
        deps = build_deps(str(self.ckpt / "lm"), f"127.0.0.1:{self.encoder.port}", decoder_target,
                          self.triton_grpc, self.redis_url, GatewayConfig(**config))
        servicer = ConversationServicer(deps)
        server = make_server(1024 * 1024)
        conversation_pb2_grpc.add_ConversationServicer_to_server(servicer, server)
        runner = ServiceRunner(server, ["vita.audio.v1.Conversation"], 0, host="127.0.0.1")
        await runner.start()
        return runner, servicer

    def gateway(self, i: int = 0) -> str:
        return f"127.0.0.1:{self.gateways[i].port}"

    def kill_decoder(self, i: int) -> None:
        self.run(self.decoders[i].server.stop(0))

    def stop(self) -> None:
        async def _stop():
            for runner in [*self.gateways, *self.decoders, self.encoder]:
                await runner.stop(0)
        self.run(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
