"""An in-process cluster for integration tests: encoder, two decoder replicas and two gateway replicas
as real gRPC servers on localhost ports, on one background event loop; real Redis and real Triton
come from tests/servers.py. Decoder replicas can be killed to test failover.
"""

from __future__ import annotations

import asyncio
import threading

from vitaserve.common.grpc_server import ServiceRunner


TRITON_MAX_LEN = 1024  # servers.triton_server's default context


class InProcessCluster:
    def __init__(self, ckpt, redis_url: str, triton_grpc: str, deterministic_decoder: bool = True):
        self.ckpt, self.redis_url, self.triton_grpc = ckpt, redis_url, triton_grpc
        self.deterministic = deterministic_decoder
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.decoders: list[ServiceRunner] = []
        self.gateways: list = []  # gateway.service.Gateway
        self.servicers = []

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "InProcessCluster":
        self.thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        from vitaserve.decoder.audio_decoder import AudioDecoder
        from vitaserve.encoder.service import encoder_replica
        from vitaserve.encoder.settings import EncoderSettings
        from vitaserve.encoder.tokenizer import SpeechTokenizer

        settings = EncoderSettings(tokenizer=str(self.ckpt / "tokenizer"), port=0, host="127.0.0.1")
        tokenizer = await asyncio.to_thread(SpeechTokenizer.from_pretrained, settings.tokenizer)
        self.encoder, _ = encoder_replica(settings, tokenizer)
        await self.encoder.start()
        self.decoder_model = await asyncio.to_thread(AudioDecoder.from_pretrained, str(self.ckpt / "decoder"))
        for _ in range(2):
            self.decoders.append(await self.start_decoder())
        self.decoder_target = decoder_target = "ipv4:" + ",".join(f"127.0.0.1:{d.port}" for d in self.decoders)
        for i in range(2):
            gateway, servicer = await self.start_gateway(decoder_target, replica_id=f"gw{i}")
            self.gateways.append(gateway)
            self.servicers.append(servicer)

    async def start_decoder(self, port: int = 0) -> ServiceRunner:
        """One more decoder replica (its runner is the caller's to stop), composed as serve() does."""
        from vitaserve.common.session_store import connect_redis
        from vitaserve.decoder.service import decoder_replica
        from vitaserve.decoder.state_store import DecoderStateStore
        from vitaserve.decoder.settings import DecoderSettings

        settings = DecoderSettings(decoder=str(self.ckpt / "decoder"), redis_url=self.redis_url, port=port,
                                   host="127.0.0.1", deterministic=self.deterministic)
        runner, _ = decoder_replica(settings, self.decoder_model, DecoderStateStore(connect_redis(settings.redis_url)))
        await runner.start()
        return runner

    async def start_gateway(self, decoder_target: str, replica_id: str = "gw-extra", *flags: str,
                            environ: dict[str, str] | None = None):
        """One more gateway replica talking to `decoder_target`, started the way a pod starts one: flags
        and the Redis URL in the environment -> GatewaySettings -> Gateway.start (serve() without the
        signal handling). (gateway, servicer); gateway.stop() stops it and closes its clients."""
        import argparse

        from vitaserve.common.settings import REDIS_URL_ENV
        from vitaserve.gateway.service import Gateway
        from vitaserve.gateway.settings import GatewaySettings

        parser = argparse.ArgumentParser()
        GatewaySettings.add_arguments(parser)
        args = parser.parse_args([
            "--lm", str(self.ckpt / "lm"), "--encoder", f"127.0.0.1:{self.encoder.port}", "--decoder", decoder_target,
            "--triton", self.triton_grpc, "--host", "127.0.0.1", "--port", "0", "--replica-id", replica_id,
            "--mode", "boost", "--max-utterance-s", "8", "--context-tokens", str(TRITON_MAX_LEN), "--plaintext",
            "--allow-anonymous", *flags])
        gateway = await Gateway.start(GatewaySettings.from_args(args, {REDIS_URL_ENV: self.redis_url, **(environ or {})}))
        return gateway, gateway.servicer

    def gateway(self, i: int = 0) -> str:
        return f"127.0.0.1:{self.gateways[i].port}"

    def kill_decoder(self, i: int) -> None:
        self.run(self.decoders[i].server.stop(0))

    def stop(self) -> None:
        async def _stop():
            for runner in [*self.gateways, *self.decoders, self.encoder]:  # a Gateway also closes its clients
                await runner.stop(0)
        self.run(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
