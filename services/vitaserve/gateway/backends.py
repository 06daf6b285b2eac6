"""The gateway's clients of the encoder and decoder services, with deadlines and bounded retries.

A target may list several replicas ("ipv4:127.0.0.1:5001,127.0.0.1:5002" or a DNS name with many
records): gRPC balances calls round-robin, and a call that fails with UNAVAILABLE (a replica died) is
retried with tenacity and lands on another one. Decoder retries are safe: a block is fenced by its
sequence number and its state lives in Redis.
"""

from __future__ import annotations

import grpc
import numpy as np
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from vitaserve.api import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from vitaserve.common.audio_facts import TOKENIZER_RATE
from vitaserve.gateway.convert import decoder_samples, encoder_pcm16

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRYABLE


def _retrying(attempts: int, total_s: float) -> AsyncRetrying:
    return AsyncRetrying(retry=retry_if_exception(_retryable), reraise=True,
                         stop=stop_after_attempt(attempts) | stop_after_delay(total_s),
                         wait=wait_exponential(multiplier=0.05, max=1.0))


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.enable_retries", 0),  # retries are ours, visible and bounded
        # a replica that comes back (a restart on the same address) is found within our retry budget,
        # not after gRPC's default reconnect backoff of 1 s growing to 120 s
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ])


class EncoderClient:
    def __init__(self, target: str, timeout_s: float = 10.0, attempts: int = 3):
        self.channel = channel(target)
        self.stub = encoder_pb2_grpc.EncoderStub(self.channel)
        self.timeout_s, self.attempts = timeout_s, attempts

    async def encode(self, samples_16k: np.ndarray) -> list[int]:
        request = encoder_pb2.EncodeRequest(pcm16=encoder_pcm16(samples_16k), sample_rate=TOKENIZER_RATE)
        async for attempt in _retrying(self.attempts, self.timeout_s * self.attempts):
            with attempt:
                response = await self.stub.Encode(request, timeout=self.timeout_s)
        return list(response.tokens)

    async def close(self) -> None:
        await self.channel.close()


class DecoderClient:
    def __init__(self, target: str, timeout_s: float = 30.0, attempts: int = 4, ode_steps: int = 0):
        self.channel = channel(target)
        self.stub = decoder_pb2_grpc.DecoderStub(self.channel)
        self.timeout_s, self.attempts, self.ode_steps = timeout_s, attempts, ode_steps

    async def decode_block(self, stream_id: str, seq: int, tokens: list[int], finalize: bool,
                           playback_slack_s: float = 0.0) -> np.ndarray:
        """Float32 PCM at 22050 Hz for one block; playback_slack_s: audio the caller has yet to play."""
        request = decoder_pb2.DecodeBlockRequest(stream_id=stream_id, seq=seq, tokens=tokens, finalize=finalize,
                                                 ode_steps=self.ode_steps, playback_slack_s=playback_slack_s)
        async for attempt in _retrying(self.attempts, self.timeout_s * 2):
            with attempt:
                response = await self.stub.DecodeBlock(request, timeout=self.timeout_s)
        return decoder_samples(response.pcm_f32)

    async def end_stream(self, stream_id: str) -> None:
        try:
            await self.stub.EndStream(decoder_pb2.EndStreamRequest(stream_id=stream_id), timeout=2.0)
        except grpc.aio.AioRpcError:
            pass  # best effort: the state expires with its TTL anyway

    async def close(self) -> None:
        await self.channel.close()
