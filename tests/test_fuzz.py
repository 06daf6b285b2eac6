"""Fuzzing every API against real servers on loopback (real Redis, Triton, encoder, decoders, gateways):
any ConverseRequest stream, Synthesize and Transcribe request, and the internal Encode and
DecodeBlock/EndStream requests gets a status from the API's documented set below (never UNKNOWN or
INTERNAL) within a per-input bound (a hang fails), while a healthy call on the same gateway keeps
completing its turns with the answers it gives when alone.

The suite runs a few hundred inputs, derandomized (the same ones every run). A full run is
`scripts/fuzz.sh [--examples N] [--seed S]` (VITA_FUZZ_EXAMPLES inputs in total, default 10000,
with the printed seed). Failures the fuzzer found are the explicit regression tests at the end.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from test_gateway_e2e import MULAW_8K

import fuzz_strategies as fs
from vitaserve.api import (audio_pb2, conversation_pb2 as pb, conversation_pb2_grpc, decoder_pb2, decoder_pb2_grpc,
                           encoder_pb2_grpc)
from vitaserve.client.scripted_phone import ScriptedPhone
from vitaserve.gateway.codecs import encode_audio

S = grpc.StatusCode

# ---- the documented status sets (ARCHITECTURE.md, "Status codes") ------------------------------------
# What a caller may get for any input, with every component healthy. UNKNOWN, INTERNAL, UNAVAILABLE
# and DEADLINE_EXCEEDED are never among them: with healthy backends they mean a bug.
CONVERSE_CALL = {
    S.OK: "half-close or HANG_UP",
    S.CANCELLED: "the caller cancelled the call itself",
    S.INVALID_ARGUMENT: "a bad config, frame or control, or messages out of order",
    S.OUT_OF_RANGE: "a push-to-talk utterance longer than --max-utterance-s",
    S.RESOURCE_EXHAUSTED: "audio faster than real time, a message over the size limit, or an overloaded replica",
    S.NOT_FOUND: "CallConfig.session_id names no live session",
}
CONVERSE_TURN = {  # Error{code} messages: the turn failed, the call goes on
    S.INVALID_ARGUMENT: "nothing to answer, the turn does not fit the context, or a playback report that cannot be "
                        "true",
    S.RESOURCE_EXHAUSTED: "a tier is overloaded",
}
SYNTHESIZE = {S.OK: "", S.INVALID_ARGUMENT: "bad text, format, mode, sampling or max_new_tokens",
              S.RESOURCE_EXHAUSTED: "over the size limit or overloaded"}
TRANSCRIBE = {S.OK: "", S.INVALID_ARGUMENT: "bad audio, format or sampling",
              S.RESOURCE_EXHAUSTED: "over the size limit or overloaded"}
ENCODE = {S.OK: "", S.INVALID_ARGUMENT: "bad PCM or sample rate", S.RESOURCE_EXHAUSTED: "over the size limit"}
DECODE_BLOCK = {S.OK: "", S.INVALID_ARGUMENT: "bad stream id, seq, tokens, ode_steps or slack",
                S.NOT_FOUND: "block seq > 0 of a stream with no state",
                S.FAILED_PRECONDITION: "a block out of sequence, or after the stream was finalized",
                S.RESOURCE_EXHAUSTED: "over the size limit or overloaded"}
END_STREAM = {S.OK: "", S.INVALID_ARGUMENT: "bad stream id"}

# ---- per-input bounds ----------------------------------------------------------------------------------
# The most work one input may ask for, on 2 cores shared with the healthy call: a Converse input
# carries at most ~6 s of audio and answers at most MAX_FUZZ_ANSWER (24) tokens per turn, a few
# turns; Transcribe up to 60 s of audio and a 512-token text answer; a decoder session 5 blocks of
# up to 400 tokens at up to 50 ODE steps. Each of those takes a few seconds here; the bound is
# several times that, so only a hang (or a server gone) crosses it.
BOUND_S = {"converse": 60.0, "synthesize": 30.0, "transcribe": 60.0, "encode": 30.0, "decoder": 60.0}

# ---- how many inputs -------------------------------------------------------------------------------------
FULL_EXAMPLES = int(os.environ.get("VITA_FUZZ_EXAMPLES", "0"))  # scripts/fuzz.sh sets it: a full run
SHARE = {"converse": 0.4, "synthesize": 0.15, "transcribe": 0.15, "encode": 0.15, "decoder": 0.15}
SUITE = {"converse": 80, "synthesize": 25, "transcribe": 12, "encode": 40, "decoder": 25}  # 182 (~250 requests)


def profile(api: str) -> settings:
    """deadline=None: the servers are remote and their time is bounded by BOUND_S instead. The suite
    is derandomized (the same inputs every run, reproducible in CI); a full run takes its seed from
    --hypothesis-seed (scripts/fuzz.sh prints it)."""
    common = dict(deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much, HealthCheck.large_base_example])
    if FULL_EXAMPLES:
        return settings(max_examples=max(1, round(FULL_EXAMPLES * SHARE[api])), **common)
    return settings(max_examples=SUITE[api], derandomize=True, **common)


STATS: Counter = Counter()  # (api, code name) -> inputs; printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_stats():
    started = time.perf_counter()
    yield
    took = time.perf_counter() - started
    total = sum(n for (api, _), n in STATS.items() if not api.endswith("/turn"))
    print(f"\nfuzz: {total} inputs in {took:.0f} s; statuses by API:")
    for api in sorted({a for a, _ in STATS}):
        print(f"  {api:12s} " + ", ".join(f"{code}={n}" for (a, code), n in sorted(STATS.items()) if a == api))


# ---- the fuzzing client: one event loop, one channel per server ----------------------------------------

class FuzzClient:
    def __init__(self, cluster):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuzz-client")
        self.thread.start()
        self.targets = {"gateway": cluster.gateway(0), "encoder": f"127.0.0.1:{cluster.encoder.port}",
                        "decoder": f"127.0.0.1:{cluster.decoders[0].port}"}
        self.channels = self.run(self._open(), 30)
        self.sync_channel = grpc.insecure_channel(self.targets["gateway"], options=[
            ("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 16 << 20)])
        self.sync_stub = conversation_pb2_grpc.ConversationStub(self.sync_channel)

    async def _open(self):
        opts = [("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 16 << 20)]
        return {name: grpc.aio.insecure_channel(t, options=opts) for name, t in self.targets.items()}

    def run(self, coro, bound_s: float):
        """The coroutine's result; a hang past bound_s fails the input."""
        try:
            return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, bound_s), self.loop).result(bound_s + 10)
        except (asyncio.TimeoutError, TimeoutError):
            pytest.fail(f"no answer within {bound_s} s: a hang")

    def close(self):
        self.sync_channel.close()

        async def close():
            for c in self.channels.values():
                await c.close()
        self.run(close(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # -- one input per API; each returns (status code, details, server messages)
    def converse(self, messages, pauses, end, bound_s: float):
        """Converse through the synchronous client: an asyncio client that writes while the server
        ends the call reports its own INTERNAL instead of the server's status (grpc#36066), which
        would hide what the server said. The gRPC deadline is the per-input bound: DEADLINE_EXCEEDED
        here is a hang."""
        holder: list = []
        have_call = threading.Event()  # the iterator may run before stub.Converse returns the call

        def requests():
            for msg, pause in zip(messages, pauses):
                if pause:
                    time.sleep(pause)
                yield msg
            if end == "hang_up":
                yield pb.ConverseRequest(control=pb.Control(action=pb.Control.HANG_UP))
            if end == "cancel" and have_call.wait(bound_s):
                holder[0].cancel()

        call = self.sync_stub.Converse(requests(), timeout=bound_s)
        holder.append(call)
        have_call.set()
        received: list[pb.ConverseResponse] = []
        try:
            for msg in call:
                received.append(msg)
        except grpc.RpcError:
            pass
        return call.code(), call.details(), received

    async def synthesize(self, request):
        call = conversation_pb2_grpc.ConversationStub(self.channels["gateway"]).Synthesize(request)
        received = [r async for r in _until_error(call)]
        return await call.code(), await call.details(), received

    async def transcribe(self, request):
        call = conversation_pb2_grpc.ConversationStub(self.channels["gateway"]).Transcribe(request)
        return await _unary(call)

    async def encode(self, request):
        return await _unary(encoder_pb2_grpc.EncoderStub(self.channels["encoder"]).Encode(request))

    async def decoder(self, steps):
        stub = decoder_pb2_grpc.DecoderStub(self.channels["decoder"])
        results = []
        for step in steps:
            if isinstance(step, decoder_pb2.EndStreamRequest):
                results.append(("end_stream", *await _unary(stub.EndStream(step))))
            else:
                results.append(("decode_block", *await _unary(stub.DecodeBlock(step))))
        return results


async def _until_error(call):
    try:
        async for r in call:
            yield r
    except grpc.aio.AioRpcError:
        return


async def _unary(call):
    try:
        reply = await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details(), None
    return await call.code(), await call.details(), reply


def check(api: str, allowed: dict, code: grpc.StatusCode, details: str) -> None:
    STATS[(api, code.name)] += 1
    if FULL_EXAMPLES and sum(STATS.values()) % 250 == 0:  # progress of a long run, for its log
        print(f"fuzz progress: {dict(sorted((f'{a}:{c}', n) for (a, c), n in STATS.items()))}", flush=True)
    assert code in allowed, f"{api}: {code.name} ({details!r}) is not in the documented set {sorted(c.name for c in allowed)}"


# ---- the healthy call beside the fuzzer ---------------------------------------------------------------

HEALTHY_CONFIG = dict(push_to_talk=True, max_new_tokens=20, input_format=MULAW_8K,
                      sampling=audio_pb2.SamplingOptions(greedy=True, repetition_penalty=1.0))


class HealthyCaller:
    """Push-to-talk calls of two turns, one after another, on the fuzzed gateway, in a thread of their
    own. The first call is the reference; every later one must finish both turns with the same
    answers (greedy: text, text and audio token counts), audio chunks in sequence and no Error."""

    TURNS = 2
    PAUSE_S = 2.0  # between calls: the healthy call's own decoder work would otherwise crowd out the fuzzer

    def __init__(self, target: str, utterance: np.ndarray):
        self.target = target
        self.frames = [encode_audio(utterance[i:i + 1600], "mulaw", 8000) for i in range(0, 8000, 1600)]
        self.reference: list[tuple] | None = None
        self.calls_done = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True, name="healthy-call")

    def start(self) -> "HealthyCaller":
        self.reference = asyncio.run(self.one_call())
        assert len(self.reference) == self.TURNS, self.reference
        self.thread.start()
        return self

    async def one_call(self) -> list[tuple]:
        phone = ScriptedPhone(self.target)
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(pb.ConverseRequest(config=pb.CallConfig(**HEALTHY_CONFIG)))
        try:
            for turn in range(1, self.TURNS + 1):
                for frame in self.frames:
                    await phone.outbox.put(pb.ConverseRequest(audio=pb.AudioFrame(data=frame)))
                await phone.control(pb.Control.END_OF_UTTERANCE)
                done = asyncio.ensure_future(phone.event(f"turn_finished:{turn}").wait())
                failed = asyncio.ensure_future(phone.event("error").wait())
                ended = await asyncio.wait([done, failed, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
                done.cancel()
                failed.cancel()
                if not ended[0] or phone.of("error") or task.done():
                    raise AssertionError(f"turn {turn}: errors {phone.of('error')}, call ended {task.done()}, "
                                         f"finished {[f.turn for f in phone.of('turn_finished')]}")
            await phone.control(pb.Control.HANG_UP)
        finally:
            await phone.outbox.put(None)
            code = await asyncio.wait_for(task, 30)
        assert code == grpc.StatusCode.OK, (code, phone.error)
        for turn in range(1, self.TURNS + 1):
            seqs = [a.seq for a in phone.of("audio") if a.turn == turn]
            assert seqs == list(range(len(seqs))), seqs
        return [(f.turn, f.text, f.text_tokens, f.audio_tokens) for f in phone.of("turn_finished")]

    async def _loop(self):
        while not self.stop.is_set():
            try:
                got = await self.one_call()
                if got != self.reference:
                    self.failures.append(f"answers {got} differ from the reference {self.reference}")
            except Exception as exc:  # noqa: BLE001 - every failure of the healthy call is a finding
                self.failures.append(repr(exc))
            self.calls_done += 1
            await asyncio.sleep(self.PAUSE_S)

    def assert_unaffected(self, since: int) -> None:
        assert not self.failures, self.failures
        deadline = time.monotonic() + 120  # at least one whole healthy call ran beside these inputs
        while self.calls_done <= since and time.monotonic() < deadline and not self.failures:
            time.sleep(0.2)
        assert not self.failures, self.failures
        assert self.calls_done > since, "the healthy call made no progress"

    def close(self):
        self.stop.set()
        self.thread.join(180)


@pytest.fixture(scope="module")
def fuzz(cluster):
    client = FuzzClient(cluster)
    yield client
    client.close()


@pytest.fixture(scope="module")
def healthy(cluster, utterance):
    caller = HealthyCaller(cluster.gateway(0), utterance).start()
    yield caller
    caller.close()
    assert not caller.failures, caller.failures


# ---- the fuzz tests ------------------------------------------------------------------------------------

def test_fuzz_converse(fuzz, healthy):
    since = healthy.calls_done

    @profile("converse")
    @given(fs.converse_stream())
    def one(stream):
        messages, pauses, end = stream
        code, details, received = fuzz.converse(messages, pauses, end, BOUND_S["converse"])
        assert code != S.DEADLINE_EXCEEDED, f"no end of the call within {BOUND_S['converse']} s: a hang"
        check("converse", CONVERSE_CALL, code, details)
        for msg in received:
            if msg.WhichOneof("message") == "error":
                turn_code = next((c for c in S if c.value[0] == msg.error.code), S.UNKNOWN)
                check("converse/turn", CONVERSE_TURN, turn_code, msg.error.message)

    one()
    healthy.assert_unaffected(since)


def test_fuzz_synthesize(fuzz, healthy):
    since = healthy.calls_done

    @profile("synthesize")
    @given(fs.synthesize_request())
    def one(request):
        code, details, received = fuzz.run(fuzz.synthesize(request), BOUND_S["synthesize"])
        check("synthesize", SYNTHESIZE, code, details)
        if code == S.OK:
            assert received and received[-1].WhichOneof("message") == "finished", received[-1:]

    one()
    healthy.assert_unaffected(since)


def test_fuzz_transcribe(fuzz, healthy):
    since = healthy.calls_done

    @profile("transcribe")
    @given(fs.transcribe_request())
    def one(request):
        code, details, _ = fuzz.run(fuzz.transcribe(request), BOUND_S["transcribe"])
        check("transcribe", TRANSCRIBE, code, details)

    one()
    healthy.assert_unaffected(since)


def test_fuzz_encoder(fuzz, healthy):
    since = healthy.calls_done

    @profile("encode")
    @given(fs.encode_request())
    def one(request):
        code, details, reply = fuzz.run(fuzz.encode(request), BOUND_S["encode"])
        check("encode", ENCODE, code, details)
        if code == S.OK:
            assert all(0 <= t < 16384 for t in reply.tokens)

    one()
    healthy.assert_unaffected(since)


def test_fuzz_decoder(fuzz, healthy):
    since = healthy.calls_done

    @profile("decoder")
    @given(fs.decoder_session())
    def one(steps):
        for rpc, code, details, reply in fuzz.run(fuzz.decoder(steps), BOUND_S["decoder"]):
            check(rpc, DECODE_BLOCK if rpc == "decode_block" else END_STREAM, code, details)
            if rpc == "decode_block" and code == S.OK:
                pcm = np.frombuffer(reply.pcm_f32, dtype="<f4")
                assert np.isfinite(pcm).all() and reply.sample_rate == 22050

    one()
    healthy.assert_unaffected(since)


# ---- regression tests: inputs the fuzzer found ---------------------------------------------------------


def _refusal_time(target: str, request: pb.ConverseRequest) -> tuple[grpc.StatusCode, float]:
    """(status, seconds from sending one config to the call's end) on an open channel."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 4 << 20)]) as channel:
        grpc.channel_ready_future(channel).result(10)
        stub = conversation_pb2_grpc.ConversationStub(channel)
        start = time.perf_counter()
        call = stub.Converse(iter([request]), timeout=30)
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass
        return call.code(), time.perf_counter() - start


def test_a_huge_system_prompt_is_refused_at_once(cluster):
    """A system prompt of ~1 MB (inside the message limit) used to be tokenized on the gateway's event
    loop before any check: every call on the replica stalled meanwhile. It is refused by its length,
    INVALID_ARGUMENT in under 100 ms (item 3's bound for a hostile number)."""
    for prompt in ("a" * 900_000, "<|im_end|>" * 90_000, "\u4f60" * 300_000):
        config = pb.CallConfig(input_format=MULAW_8K, system_prompt=prompt, max_new_tokens=10)
        code, took = _refusal_time(cluster.gateway(0), pb.ConverseRequest(config=config))
        assert code == S.INVALID_ARGUMENT and took < 0.1, (code, took)


def test_a_caller_that_cancels_as_its_call_opens_is_no_internal_error(cluster):
    """A caller that cancels while the gateway opens its call (the fuzzer's `cancel` inputs) made the
    SessionStarted write fail with the core's ExecuteBatchError, which the gateway logged and counted
    as an INTERNAL failure of its own (vita_gateway_errors_total{code="INTERNAL"}), polluting the
    errors-by-code alert. A caller going away is not a server error."""
    from vitaserve.common import metrics

    internal = metrics.GATEWAY_ERRORS.labels("INTERNAL")
    before = internal._value.get()
    config = pb.ConverseRequest(config=pb.CallConfig(input_format=MULAW_8K, max_new_tokens=10))
    with grpc.insecure_channel(cluster.gateway(0)) as channel:
        stub = conversation_pb2_grpc.ConversationStub(channel)
        for i in range(40):
            hold = threading.Event()

            def requests():
                yield config
                hold.wait(5)

            call = stub.Converse(requests(), timeout=30)
            time.sleep(0.0005 * i)  # 0..20 ms: across the gateway's open (config checks, Redis create)
            call.cancel()
            hold.set()
    time.sleep(1.0)
    assert internal._value.get() == before


def test_a_triton_unloading_its_model_is_unavailable_not_internal():
    """Found by a full run whose tritonserver was stopped under it (SIGTERM from outside): while Triton
    unloads the model it answers "Request for unknown model: ... has no available versions", which
    the gateway passed to callers as INTERNAL. A generator that is stopping or starting is UNAVAILABLE
    (retry elsewhere), like Triton's "not ready"."""
    from vitaserve.gateway.generator_client import GeneratorError

    for text in ("Request for unknown model: 'vita_generator' has no available versions",
                 "Request for unknown model: 'vita_generator' is not found"):
        assert GeneratorError.from_text(text).code == S.UNAVAILABLE, text
    assert GeneratorError.from_text("[INVALID_ARGUMENT] temperature ...").code == S.INVALID_ARGUMENT
    assert GeneratorError.from_text("something broke").code == S.INTERNAL
