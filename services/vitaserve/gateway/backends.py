"""The gateway's clients of the encoder and decoder services, with deadlines and bounded retries.

A target may list several replicas ("ipv4:127.0.0.1:5001,127.0.0.1:5002" or a DNS name with many
records): gRPC balances calls round-robin, and a call that fails with UNAVAILABLE (a replica died) or
RESOURCE_EXHAUSTED (a replica is full) is retried with tenacity and lands on another one. Decoder
retries are safe: a block is fenced by its sequence number and its state lives in Redis.

Retries are bounded twice: per call (attempts, total time) and per backend (`RetryBudget`): when a
whole tier fails, every call retrying would multiply its load by the attempts just when it can least
take it; with a budget the extra load is a fraction of the calls, and calls beyond it fail at once
with the backend's own status. DEADLINE_EXCEEDED is not retried: the attempt already spent the hop's
deadline (a turn cannot wait it twice), and the work it asked for may still be running on a slow
replica, which a retry would only add to.

Every call carries the current trace (common/tracing.py) as metadata. With `tls` (common/tls.ClientTls)
the channel is TLS, presenting the gateway's certificate to backends that require mutual TLS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import numpy as np
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential
from tenacity.stop import stop_base

from vitaserve.api import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from vitaserve.common import metrics, tracing
from vitaserve.common.audio_facts import TOKENIZER_RATE
from vitaserve.common.retry_hint import says_no_retry
from vitaserve.common.channel_options import RECONNECT_BACKOFF
from vitaserve.common.tls import ClientTls, secure_or_insecure_channel
from vitaserve.gateway.convert import decoder_samples, encoder_pcm16

# CANCELLED from a backend is the server's doing (a replica stopping mid-call cancels its RPCs; our
# own cancellations raise asyncio.CancelledError instead), so another replica may serve it.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRYABLE and not says_no_retry(exc)


class RetryBudget:
    """Retries of one backend, for the whole process: at most `ratio` of its calls plus `floor_per_s`
    per second, of which at most `burst` may be saved up.

    A token bucket (the retry budget of Finagle, gRPC's retry throttling): each call deposits `ratio`
    tokens, each second `floor_per_s` (so a quiet replica can still retry a rare failure), and a
    retry takes one whole token; the bucket holds at most `burst`, so what a quiet hour saved cannot
    be spent at once on an outage. Hence, over any stretch of time t starting from a full bucket:
    retries <= burst + ratio x calls + floor_per_s x t. Used from one event loop: no lock.
    """

    def __init__(self, ratio: float = 0.2, floor_per_s: float = 1.0, burst: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if not (0 <= ratio <= 1 and 0 <= floor_per_s < float("inf") and 1 <= burst < float("inf")):
            raise ValueError(f"retry budget needs 0 <= ratio <= 1, 0 <= floor_per_s, 1 <= burst; got "
                             f"{ratio}, {floor_per_s}, {burst}")
        self.ratio, self.floor_per_s, self.burst, self.clock = ratio, floor_per_s, burst, clock
        self.tokens = burst
        self._at = clock()

    def _refill(self, calls: int = 0) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + self.ratio * calls + self.floor_per_s * max(0.0, now - self._at))
        self._at = now

    def on_call(self) -> None:
        """A call's first attempt: deposit."""
        self._refill(calls=1)

    def try_retry(self) -> bool:
        """Take a token for one retry; False when the budget is spent (then the call fails as it is)."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _stop_when_budget_spent(stop_base):
    """Stop retrying when the budget has no token; evaluated last (after attempts and time), so a
    token is taken only by a retry that happens."""

    def __init__(self, budget: RetryBudget, backend: str):
        self.budget, self.backend = budget, backend

    def __call__(self, retry_state) -> bool:
        allowed = self.budget.try_retry()
        metrics.GATEWAY_BACKEND_RETRIES.labels(self.backend, "retried" if allowed else "denied").inc()
        return not allowed


def _retrying(attempts: int, total_s: float, budget: RetryBudget, backend: str) -> AsyncRetrying:
    budget.on_call()
    return AsyncRetrying(retry=retry_if_exception(_retryable), reraise=True,
                         stop=stop_after_attempt(attempts) | stop_after_delay(total_s)
                         | _stop_when_budget_spent(budget, backend),
                         wait=wait_exponential(multiplier=0.05, max=1.0))


def channel(target: str, tls: ClientTls | None = None) -> grpc.aio.Channel:
    return secure_or_insecure_channel(target, tls, options=[
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.enable_retries", 0),  # retries are ours, visible and bounded
        *RECONNECT_BACKOFF,
        # No keepalive: every call has a deadline, which is what finds a frozen replica. A ping
        # timeout shorter than a call's deadline raced it: a SIGSTOPped decoder then failed the turn
        # UNAVAILABLE (ping timeout, then a new connection that never got SETTINGS) or
        # DEADLINE_EXCEEDED, by chance (fault matrix, decoder/hung/turn_start).
    ])


class EncoderClient:
    def __init__(self, target: str, timeout_s: float = 10.0, attempts: int = 3, budget: RetryBudget | None = None,
                 tls: ClientTls | None = None):
        self.channel = channel(target, tls)
        self.stub = encoder_pb2_grpc.EncoderStub(self.channel)
        self.timeout_s, self.attempts = timeout_s, attempts
        self.budget = budget or RetryBudget()

    async def encode(self, samples_16k: np.ndarray) -> list[int]:
        request = encoder_pb2.EncodeRequest(pcm16=encoder_pcm16(samples_16k), sample_rate=TOKENIZER_RATE)
        async for attempt in _retrying(self.attempts, self.timeout_s * self.attempts, self.budget, "encoder"):
            with attempt:
                response = await self.stub.Encode(request, timeout=self.timeout_s, metadata=tracing.grpc_metadata())
        return list(response.tokens)

    async def close(self) -> None:
        await self.channel.close()


class DecoderClient:
    def __init__(self, target: str, timeout_s: float = 30.0, attempts: int = 4, ode_steps: int = 0,
                 budget: RetryBudget | None = None, tls: ClientTls | None = None):
        self.channel = channel(target, tls)
        self.stub = decoder_pb2_grpc.DecoderStub(self.channel)
        self.timeout_s, self.attempts, self.ode_steps = timeout_s, attempts, ode_steps
        self.budget = budget or RetryBudget()
        self._ending: set[asyncio.Task] = set()  # EndStream calls in flight (end_stream_soon)

    async def decode_block(self, stream_id: str, seq: int, tokens: list[int], finalize: bool,
                           playback_slack_s: float = 0.0) -> np.ndarray:
        """Float32 PCM at 22050 Hz for one block; playback_slack_s: audio the caller has yet to play."""
        request = decoder_pb2.DecodeBlockRequest(stream_id=stream_id, seq=seq, tokens=tokens, finalize=finalize,
                                                 ode_steps=self.ode_steps, playback_slack_s=playback_slack_s)
        async for attempt in _retrying(self.attempts, self.timeout_s * 2, self.budget, "decoder"):
            with attempt:
                response = await self.stub.DecodeBlock(request, timeout=self.timeout_s,
                                                       metadata=tracing.grpc_metadata())
        return decoder_samples(response.pcm_f32)

    async def end_stream(self, stream_id: str) -> None:
        try:
            await self.stub.EndStream(decoder_pb2.EndStreamRequest(stream_id=stream_id), timeout=2.0,
                                      metadata=tracing.grpc_metadata())
        except (grpc.aio.AioRpcError, grpc.aio.UsageError):
            pass  # best effort: the state expires with its TTL anyway

    def end_stream_soon(self, stream_id: str) -> None:
        """end_stream off the caller's path: a turn neither waits for it to finish (nor, when the
        decoder hangs, for its 2 s deadline) before it reports its end. close() waits for these."""
        task = asyncio.get_running_loop().create_task(self.end_stream(stream_id))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._ending, return_exceptions=True)
        await self.channel.close()
