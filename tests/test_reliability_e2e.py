"""The reliability issue's call-breakers against real servers (Redis, Triton, gRPC on loopback):
a failed turn reaches the caller as Error{code, turn} and the next turn works; hostile numbers are
refused at once without touching a healthy call beside them; a long call finishes every turn."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from test_gateway_e2e import MULAW_8K, Phone, audio_msg, call_with, config, history, wait
from test_triton_generator import collect, offline

from vitaserve.api import audio_pb2, conversation_pb2 as pb, conversation_pb2_grpc
from vitaserve.gateway.codecs import encode_audio
from vitaserve.gateway.generator_client import GenerationOptions, GeneratorClient, GeneratorError

HOSTILE_MODE = "1,1,1000000000000,1"  # 19 bytes: walked ~1e12 steps on the event loop before


async def say(phone: Phone, samples: np.ndarray) -> None:
    """A push-to-talk utterance: 200 ms messages as fast as the real-time allowance lets them go,
    then END_OF_UTTERANCE."""
    for i in range(0, len(samples), 1600):
        await phone.outbox.put(audio_msg(encode_audio(samples[i : i + 1600], "mulaw", 8000)))
    await phone.control(pb.Control.END_OF_UTTERANCE)


async def ptt_turn(phone: Phone, samples: np.ndarray, turn: int, timeout: float = 60) -> None:
    """One push-to-talk turn: the utterance as fast as the real-time allowance lets it go, then
    END_OF_UTTERANCE; waits for that turn's TurnFinished or a new Error."""
    phone.event("error").clear()
    await say(phone, samples)
    done = asyncio.ensure_future(phone.event(f"turn_finished:{turn}").wait())
    failed = asyncio.ensure_future(phone.event("error").wait())
    try:
        await asyncio.wait_for(asyncio.wait([done, failed], return_when=asyncio.FIRST_COMPLETED), timeout)
    finally:
        done.cancel()
        failed.cancel()


async def healthy_turn(target: str, utterance: np.ndarray) -> Phone:
    phone = Phone(target)
    task = asyncio.create_task(phone.run())
    await phone.outbox.put(config(push_to_talk=True))
    await ptt_turn(phone, utterance[:8000], 1)
    await phone.control(pb.Control.HANG_UP)
    await phone.outbox.put(None)
    await task
    return phone


def test_hostile_numbers_are_refused_at_once_beside_a_healthy_call(cluster, utterance):
    """Item 3 (and item 2 at the edge): INVALID_ARGUMENT in under 100 ms for Converse and
    Synthesize, while a healthy call on the same gateway completes its turn."""
    target = cluster.gateway(0)
    bad_configs = [config(mode=HOSTILE_MODE), config(max_new_tokens=2**31 - 1), config(max_new_tokens=-5),
                   config(sampling=audio_pb2.SamplingOptions(temperature=1e-45)),
                   config(sampling=audio_pb2.SamplingOptions(top_p=float("nan"))),
                   config(mode="1," * 300 + "1")]
    bad_synth = [pb.SynthesizeRequest(text="hi", mode=HOSTILE_MODE),
                 pb.SynthesizeRequest(text="hi", sampling=audio_pb2.SamplingOptions(temperature=1e-45)),
                 pb.SynthesizeRequest(text="hi", max_new_tokens=10**9)]

    async def synth(channel, request):
        stub = conversation_pb2_grpc.ConversationStub(channel)
        try:
            async for _ in stub.Synthesize(request):
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    async def timed(coro):
        start = time.perf_counter()
        result = await coro
        return result, time.perf_counter() - start

    async def main():
        good = asyncio.create_task(healthy_turn(target, utterance))
        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            conv = [await timed(call_with(target, [c])) for c in bad_configs]
            syn = [await timed(synth(channel, r)) for r in bad_synth]
        return conv, syn, await good

    conv, syn, phone = asyncio.run(main())
    for (code, details, _), took in conv:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert took < 0.1 + 0.2, took  # 100 ms to refuse, plus a channel set-up per call_with
    for code, took in syn:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and took < 0.1
    assert phone.of("turn_finished") and not phone.of("error")


def test_triton_refuses_a_subnormal_temperature_and_the_call_beside_it_is_exact(cluster, triton, tiny_lm):
    """Item 2 through Triton: the bad request gets INVALID_ARGUMENT; a greedy call submitted with it
    equals its offline generation token for token; the engine serves later calls."""
    prompt = list(range(40, 60))

    async def main():
        client = GeneratorClient(triton["grpc"])
        try:
            bad = collect(client, prompt, GenerationOptions(mode="boost", max_new_tokens=30, temperature=1e-45,
                                                            greedy=False))
            good = collect(client, prompt, GenerationOptions(mode="boost", max_new_tokens=30, greedy=True))
            results = await asyncio.gather(bad, good, return_exceptions=True)
            later = await collect(client, prompt, GenerationOptions(mode="boost", max_new_tokens=30, greedy=True))
            return results, later
        finally:
            await client.close()

    (bad, good), later = asyncio.run(main())
    assert isinstance(bad, GeneratorError) and bad.code == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert "temperature" in str(bad)
    want = offline(tiny_lm, prompt, "boost", 30)
    assert [t.token_id for t in good] == want and [t.token_id for t in later] == want


def test_decoder_failure_mid_answer_is_an_error_and_the_next_turn_works(cluster, utterance):
    """Item 1: the only decoder of a gateway dies after the first audio chunk: the caller gets
    Error{UNAVAILABLE, turn 1} (no hang, no lost TurnFinished), the decoder comes back on the same
    port, and the next turn completes; the history is consecutive turns, the failed one kept as
    heard (interrupted)."""
    decoder = cluster.run(cluster.start_decoder())
    port = decoder.port
    gateway, _ = cluster.run(cluster.start_gateway(f"127.0.0.1:{port}", replica_id="gw-item1"))
    target = f"127.0.0.1:{gateway.port}"

    async def main():
        phone = Phone(target)
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True, max_new_tokens=300, sampling=audio_pb2.SamplingOptions(
            greedy=True, repetition_penalty=1.0)))
        await say(phone, utterance[:8000])
        await wait(phone.event("audio"))
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(decoder.stop(0), cluster.loop))
        await wait(phone.event("error"), 30)
        restarted = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(cluster.start_decoder(port),
                                                                                cluster.loop))
        failed_turn = phone.of("error")[0].turn
        await ptt_turn(phone, utterance[:8000], failed_turn + 1)
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task, restarted

    try:
        phone, code, restarted = asyncio.run(main())
        cluster.run(restarted.stop(0))
    finally:
        cluster.run(gateway.stop(0))
    assert code == grpc.StatusCode.OK
    (error,) = phone.of("error")
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0] and error.turn == 1, error
    # item 9: a short message and an error id; the backend's address and status details stay in the log
    assert "error id" in error.message and "127.0.0.1" not in error.message and "ipv4" not in error.message
    finished = phone.of("turn_finished")
    assert [f.turn for f in finished] == [2]
    turns = history(cluster, phone.of("session_started")[0].session_id)
    assert [t.turn for t in turns] == [1, 2]
    assert turns[0].interrupted and turns[0].assistant_ids and not turns[1].interrupted


def test_a_failed_turn_before_any_audio_gives_its_number_back(cluster, utterance):
    """Item 1, failure before anything was heard: the decoder is down from the start; Error for
    turn 1, then with the decoder back the next turn is turn 1 again: no gap in the history."""
    from vitaserve.devcluster.processes import free_port

    port = free_port()
    gateway, _ = cluster.run(cluster.start_gateway(f"127.0.0.1:{port}", replica_id="gw-item1b"))
    target = f"127.0.0.1:{gateway.port}"

    async def main():
        phone = Phone(target)
        task = asyncio.create_task(phone.run())
        # greedy with the default penalty: this tiny checkpoint answers audio first, so nothing is heard
        await phone.outbox.put(config(push_to_talk=True, max_new_tokens=40, sampling=audio_pb2.SamplingOptions(
            greedy=True)))
        await ptt_turn(phone, utterance[:8000], 1)
        decoder = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(cluster.start_decoder(port),
                                                                              cluster.loop))
        await ptt_turn(phone, utterance[:8000], phone.of("error")[0].turn)
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task, decoder

    try:
        phone, code, decoder = asyncio.run(main())
        cluster.run(decoder.stop(0))
    finally:
        cluster.run(gateway.stop(0))
    assert code == grpc.StatusCode.OK
    (error,) = phone.of("error")
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    turns = history(cluster, phone.of("session_started")[0].session_id)
    assert [f.turn for f in phone.of("turn_finished")] == [t.turn for t in turns][-1:]
    assert [t.turn for t in turns] == list(range(1, len(turns) + 1))


def test_a_40_turn_call_finishes_every_turn(cluster, utterance):
    """Item 4: the history outgrows the 1024-token context after a few turns; the prompt keeps the
    newest whole turns that fit, and every one of 40 turns finishes."""
    async def main():
        phone = Phone(cluster.gateway(0))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True, max_new_tokens=60, sampling=audio_pb2.SamplingOptions(
            greedy=True, repetition_penalty=1.0)))
        for turn in range(1, 41):
            await ptt_turn(phone, utterance[:4000], turn)
            assert not phone.of("error"), phone.of("error")
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task

    phone, code = asyncio.run(main())
    assert code == grpc.StatusCode.OK
    assert [f.turn for f in phone.of("turn_finished")] == list(range(1, 41))
    turns = history(cluster, phone.of("session_started")[0].session_id)
    assert [t.turn for t in turns][-1] == 40
    assert sum(len(t.user_audio) + len(t.assistant_ids) for t in turns) > 1024  # really outgrew the context


def test_a_hung_triton_fails_the_turn_within_the_token_gap_and_the_next_turn_works(cluster, triton, utterance):
    """Item 5: tritonserver stopped (SIGSTOP) mid-answer: the turn ends with DEADLINE_EXCEEDED within
    the token gap + 1 s instead of hanging the call; once Triton runs again the next turn completes."""
    import os
    import signal

    gateway, _ = cluster.run(cluster.start_gateway(cluster.decoder_target, "gw-item5", "--token-gap-s", "2"))
    target = f"127.0.0.1:{gateway.port}"

    async def main():
        phone = Phone(target)
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True, max_new_tokens=600, sampling=audio_pb2.SamplingOptions(
            greedy=True, repetition_penalty=1.0)))
        await say(phone, utterance[:8000])
        await wait(phone.event("audio"))
        os.kill(triton["pid"], signal.SIGSTOP)
        stopped = time.perf_counter()
        try:
            await wait(phone.event("error"), 10)
            took = time.perf_counter() - stopped
        finally:
            os.kill(triton["pid"], signal.SIGCONT)
        await ptt_turn(phone, utterance[:8000], phone.of("error")[0].turn + 1)
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task, took

    try:
        phone, code, took = asyncio.run(main())
    finally:
        cluster.run(gateway.stop(0))
    assert code == grpc.StatusCode.OK
    (error,) = phone.of("error")
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and took < 2 + 1, (error, took)
    assert len(phone.of("turn_finished")) == 1  # the next turn, on the resumed Triton


def test_drain_refuses_every_new_rpc_and_ends_running_calls_within_one_grace(cluster, utterance):
    """Item 8: a gateway told to stop turns NOT_SERVING, refuses new Converse, Synthesize and Transcribe
    calls with UNAVAILABLE, and stops within one grace period (it waited the grace twice before: once
    for its calls, once more in the server's stop)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gateway, servicer = cluster.run(cluster.start_gateway(cluster.decoder_target, "gw-item8"))
    target, grace_s = f"127.0.0.1:{gateway.port}", 3.0

    async def main():
        phone = Phone(target)
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True, max_new_tokens=900, sampling=audio_pb2.SamplingOptions(
            greedy=True, repetition_penalty=1.0)))  # an answer far longer than the grace
        await say(phone, utterance[:8000])
        await wait(phone.event("audio"))
        started = time.perf_counter()
        drain = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            gateway.runner.drain(grace_s, on_drain=lambda: servicer.drain(grace_s)), cluster.loop))
        async with grpc.aio.insecure_channel(target) as channel:
            await asyncio.sleep(0.2)
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            stub = conversation_pb2_grpc.ConversationStub(channel)
            refused = []
            late = Phone(target)  # keeps its stream open: the refusal, not a half-close, ends it
            late_call = asyncio.create_task(late.run())
            await late.outbox.put(config())
            refused.append(await asyncio.wait_for(late_call, 10))
            for rpc in (lambda: anext(aiter(stub.Synthesize(pb.SynthesizeRequest(text="hi")))),
                        lambda: stub.Transcribe(pb.TranscribeRequest(audio=b"\xff" * 1600, format=MULAW_8K))):
                try:
                    await rpc()
                    refused.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    refused.append(exc.code())
        await drain
        took = time.perf_counter() - started
        await phone.outbox.put(None)
        await asyncio.wait_for(task, 10)
        return health.status, refused, took

    try:
        status, refused, took = asyncio.run(main())
    finally:
        cluster.run(gateway.stop(0))
    assert status == 2  # NOT_SERVING
    assert refused == [grpc.StatusCode.UNAVAILABLE] * 3, refused
    assert took < grace_s + 1.0, took
