"""The Encoder and Decoder gRPC services, served for real on localhost (port 0) with a real Redis.

Each test runs its servers inside its own event loop; the tiny tokenizer and decoder are loaded once.
Results are compared with the model code driven offline: tokens equal, PCM equal sample for sample.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
import wave
from contextlib import ExitStack, asynccontextmanager

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vitaserve.api import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from vitaserve.common.resample import resample
from vitaserve.common.session_store import connect_redis
from vitaserve.decoder.service import decoder_replica
from vitaserve.decoder.state_store import DecoderStateStore
from vitaserve.decoder.settings import DecoderSettings
from vitaserve.encoder.service import MAX_MESSAGE_BYTES, encoder_replica
from vitaserve.encoder.settings import EncoderSettings

from audio_checks import assert_close_snr, source_snr_db

ENCODER = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name
DECODER = decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name
BLOCKS = (10, 25, 50, 15)  # tokens per block; the last one is final
Code = grpc.StatusCode


# -- models, audio and the offline references ------------------------------------------------------
@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    from vitaserve.decoder.checkpoint import write_decoder_checkpoint
    from vitaserve.encoder.checkpoint import write_tokenizer_checkpoint

    root = tmp_path_factory.mktemp("codec")
    write_tokenizer_checkpoint(root / "tokenizer", "tiny")
    write_decoder_checkpoint(root / "decoder", "tiny")
    return root


@pytest.fixture(scope="module")
def tokenizer(codec_dir):
    from vitaserve.encoder.tokenizer import SpeechTokenizer

    return SpeechTokenizer.from_pretrained(codec_dir / "tokenizer")


@pytest.fixture(scope="module")
def audio_decoder(codec_dir):
    from vitaserve.decoder.audio_decoder import AudioDecoder

    return AudioDecoder.from_pretrained(codec_dir / "decoder")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[np.ndarray, int]:
    """A spoken sentence from espeak-ng as written: int16 samples and their rate (22050 Hz)."""
    path = tmp_path_factory.mktemp("speech") / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Please book a table for two at eight tonight."], check=True)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy(), w.getframerate()


@pytest.fixture(scope="module")
def answer_tokens() -> list[int]:
    return np.random.default_rng(7).integers(0, 16384, sum(BLOCKS)).tolist()


def blocks_of(tokens: list[int]) -> list[list[int]]:
    ends = np.cumsum(BLOCKS)
    return [tokens[e - n : e] for n, e in zip(BLOCKS, ends)]


@pytest.fixture(scope="module")
def offline(audio_decoder, answer_tokens) -> list[tuple[np.ndarray, bytes]]:
    """AudioDecoder.decode_chunk over the same blocks: (PCM, state bytes after it) per block."""
    state = audio_decoder.start_stream(deterministic=True)
    out = []
    blocks = blocks_of(answer_tokens)
    for i, block in enumerate(blocks):
        pcm, state = audio_decoder.decode_chunk(state, block, finalize=i == len(blocks) - 1, ode_steps=10)
        out.append((pcm, state.to_bytes()))
    return out


def same_state(a: bytes, b: bytes) -> bool:
    """Equal decoder states (the bytes themselves may order their metadata differently)."""
    from vitaserve.decoder.stream_state import DecoderStreamState

    x, y = DecoderStreamState.from_bytes(a), DecoderStreamState.from_bytes(b)
    return (all(torch.equal(getattr(x, k), getattr(y, k)) for k in x._TENSORS)
            and all(getattr(x, k) == getattr(y, k) for k in x._SCALARS))


def as_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


# -- servers -----------------------------------------------------------------------------------------
def _channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.enable_retries", 0)])


@asynccontextmanager
async def encoder_server(tokenizer, max_batch: int = 8, max_wait_ms: float = 50.0):
    settings = EncoderSettings(tokenizer="(loaded once per module)", port=0, host="127.0.0.1", max_batch=max_batch,
                               max_wait_ms=max_wait_ms)
    runner, _ = encoder_replica(settings, tokenizer)  # as serve() composes it
    await runner.start()
    channel = _channel(runner.port)
    try:
        yield encoder_pb2_grpc.EncoderStub(channel), runner
    finally:
        await channel.close()
        await runner.stop(0)


@asynccontextmanager
async def decoder_server(audio_decoder, redis_url: str, namespace: str, deterministic: bool = True, **batching):
    """One decoder replica (its own Redis client) in `namespace`; replicas in one namespace share streams.
    Built as serve() builds it; yields the replica's DecoderStateStore."""
    redis = connect_redis(redis_url, timeout_s=0.5)
    settings = DecoderSettings(decoder="(loaded once per module)", redis_url=redis_url, port=0, host="127.0.0.1",
                               deterministic=deterministic, **batching)
    runner, servicer = decoder_replica(settings, audio_decoder, DecoderStateStore(redis, namespace=namespace))
    store = servicer.states
    await runner.start()
    channel = _channel(runner.port)
    try:
        yield decoder_pb2_grpc.DecoderStub(channel), runner, store
    finally:
        await channel.close()
        await runner.stop(0)
        await redis.aclose()


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def block_request(stream: str, seq: int, tokens: list[int], final: bool = False, ode_steps: int = 0):
    return decoder_pb2.DecodeBlockRequest(stream_id=stream, seq=seq, tokens=tokens, finalize=final,
                                          ode_steps=ode_steps)


def slack(request, seconds: float):
    request.playback_slack_s = seconds
    return request


def pcm_of(response) -> np.ndarray:
    return np.frombuffer(response.pcm_f32, dtype="<f4")


# -- Encode ------------------------------------------------------------------------------------------
def test_encode_equals_offline_tokenizer_resampled_and_native(tokenizer, speech):
    pcm, rate = speech
    assert rate == 22050
    as_float = pcm.astype(np.float32) / 32768.0
    pcm_16k = as_pcm16(resample(as_float, rate, 16000))
    want_22k = tokenizer.encode([as_float], rate)[0]
    want_16k = tokenizer.encode([np.frombuffer(pcm_16k, "<i2").astype(np.float32) / 32768.0], 16000)[0]

    async def main():
        async with encoder_server(tokenizer) as (stub, _):
            return (await stub.Encode(encoder_pb2.EncodeRequest(pcm16=pcm.tobytes(), sample_rate=rate)),
                    await stub.Encode(encoder_pb2.EncodeRequest(pcm16=pcm_16k, sample_rate=16000)))

    r22, r16 = asyncio.run(main())
    seconds = len(pcm) / rate
    assert list(r22.tokens) == want_22k and list(r16.tokens) == want_16k
    assert abs(len(want_22k) - 12.5 * seconds) <= 2 and all(0 <= t < 16384 for t in want_22k)
    assert r22.audio_s == pytest.approx(seconds, abs=1e-3) and r16.audio_s == pytest.approx(seconds, abs=1e-3)
    assert r22.batch_size == 1 and r22.compute_ms > 0
    print(f"\nencode {seconds:.2f} s: {len(want_22k)} tokens, compute {r22.compute_ms:.1f} ms")


def test_concurrent_encodes_are_batched_and_each_gets_its_own_tokens(tokenizer, speech):
    pcm, rate = speech
    parts = [pcm[: len(pcm) * (i + 3) // 10] for i in range(8)]  # 8 different lengths
    want = [tokenizer.encode([p.astype(np.float32) / 32768.0], rate)[0] for p in parts]
    assert len({tuple(w) for w in want}) == 8  # a mix-up would show

    async def main():
        async with encoder_server(tokenizer, max_batch=8, max_wait_ms=50) as (stub, _):
            return await asyncio.gather(*[
                stub.Encode(encoder_pb2.EncodeRequest(pcm16=p.tobytes(), sample_rate=rate)) for p in parts])

    replies = asyncio.run(main())
    assert [list(r.tokens) for r in replies] == want
    sizes = [r.batch_size for r in replies]
    assert max(sizes) > 1 and all(1 <= s <= 8 for s in sizes)
    print(f"\nbatch sizes of 8 concurrent calls: {sizes}; compute ms: {[round(r.compute_ms, 1) for r in replies]}")


@pytest.mark.parametrize("pcm16, rate, message", [
    (b"\x01\x02\x03", 16000, "odd number of bytes"),
    (b"", 16000, "empty"),
    (b"\x00\x00" * 1600, 12345, "12345 not supported"),
    (b"\x00\x00" * 1600, 0, "sample_rate 0 not supported"),
    (b"\x00\x00" * (8000 * 121), 8000, "121.0 s of audio is over the 120 s limit"),
    (b"\x00\x00" * (16000 * 121), 16000, "over the 120 s limit"),
    (b"\x01\x00", 48000, "shorter than one sample at 16000 Hz"),
])
def test_bad_encode_request_is_invalid_argument_and_server_keeps_serving(tokenizer, speech, pcm16, rate, message):
    pcm, speech_rate = speech
    good = encoder_pb2.EncodeRequest(pcm16=pcm.tobytes(), sample_rate=speech_rate)

    async def main():
        async with encoder_server(tokenizer) as (stub, _):
            err = await rpc_error(stub.Encode(encoder_pb2.EncodeRequest(pcm16=pcm16, sample_rate=rate)))
            # a bad call alongside good ones in the same batch window fails alone
            *oks, err2 = await asyncio.gather(stub.Encode(good), stub.Encode(good),
                                              rpc_error(stub.Encode(encoder_pb2.EncodeRequest(pcm16=pcm16, sample_rate=rate))))
            return err, err2, oks

    err, err2, oks = asyncio.run(main())
    for e in (err, err2):
        assert e.code() == Code.INVALID_ARGUMENT and message in e.details(), e.details()
    want = tokenizer.encode([pcm.astype(np.float32) / 32768.0], speech_rate)[0]
    assert [list(r.tokens) for r in oks] == [want, want]


# -- DecodeBlock -------------------------------------------------------------------------------------
def test_stream_through_the_service_equals_offline_decode_chunk(audio_decoder, redis_url, answer_tokens, offline):
    ns, stream = f"t{uuid.uuid4().hex[:8]}", "tts:one"
    blocks = blocks_of(answer_tokens)

    async def main():
        async with decoder_server(audio_decoder, redis_url, ns) as (stub, _, store):
            replies, stored = [], []
            for seq, block in enumerate(blocks):
                final = seq == len(blocks) - 1
                replies.append(await stub.DecodeBlock(block_request(stream, seq, block, final, ode_steps=10 * (seq % 2))))
                stored.append((await store.get(stream))[:2])
            await stub.EndStream(decoder_pb2.EndStreamRequest(stream_id=stream))
            gone = [await store.get(stream), [k async for k in store.redis.scan_iter(match=f"{ns}:*")]]
            return replies, stored, gone

    replies, stored, gone = asyncio.run(main())
    for seq, (reply, (seq_stored, data), (want_pcm, want_state)) in enumerate(zip(replies, stored, offline)):
        assert reply.seq == seq and reply.sample_rate == 22050
        assert np.array_equal(pcm_of(reply), want_pcm), f"block {seq} differs from decode_chunk"
        assert seq_stored == seq and same_state(data, want_state) and reply.state_bytes == len(data)
    assert gone == [None, []]  # EndStream left nothing of the stream in Redis
    print("\nblock tokens, compute ms, state bytes:",
          [(len(b), round(r.compute_ms), r.state_bytes) for b, r in zip(blocks, replies)])


def test_concurrent_streams_share_forwards_and_each_gets_its_own_audio(audio_decoder, redis_url):
    """Four calls answering at once: each block round is one batch of 4 (the same block of streams cut
    the same way), a stream at another block runs beside them alone, and every stream's PCM equals
    its offline decode (seeded noise, per stream, so batch-mates cannot leak into it)."""
    from prometheus_client import REGISTRY

    ns = f"t{uuid.uuid4().hex[:8]}"
    plan = (10, 25, 14)
    streams = {f"call{i}:t1": np.random.default_rng(50 + i).integers(0, 16384, sum(plan)).tolist() for i in range(4)}
    lone = np.random.default_rng(99).integers(0, 16384, 12).tolist()  # shapes of its own: never batched
    batches_before = REGISTRY.get_sample_value("vita_decoder_batch_size_count") or 0.0

    async def main():
        async with decoder_server(audio_decoder, redis_url, ns, deterministic=False, max_batch=8,
                                  max_wait_ms=100) as (stub, _, _):
            rounds, offset = [], 0
            for seq, size in enumerate(plan):
                final = seq == len(plan) - 1
                calls = [stub.DecodeBlock(block_request(sid, seq, toks[offset : offset + size], final, ode_steps=3))
                         for sid, toks in streams.items()]
                if seq == 0:
                    calls.append(stub.DecodeBlock(block_request("other:t1", 0, lone, True, ode_steps=3)))
                rounds.append(await asyncio.gather(*calls))
                offset += size
            return rounds

    rounds = asyncio.run(main())
    assert rounds[0][-1].batch_size == 1  # the lone block did not join a batch of other shapes
    offset = 0
    states = {sid: audio_decoder.start_stream() for sid in streams}
    for seq, (size, replies) in enumerate(zip(plan, rounds)):
        final = seq == len(plan) - 1
        assert [r.batch_size for r in replies[:4]] == [4, 4, 4, 4], f"block {seq} was not batched"
        for (sid, toks), reply in zip(streams.items(), replies):
            want, states[sid] = audio_decoder.decode_chunk(states[sid], toks[offset : offset + size], final, 3)
            frames = -(-len(want) // 256)  # vocoded frames of this block (HiFT hop: 256 samples)
            assert_close_snr(pcm_of(reply), want, f"{sid} block {seq}", source_snr_db(max(frames, 1)))
        offset += size
    assert REGISTRY.get_sample_value("vita_decoder_batch_size_count") - batches_before == 4  # 3 rounds + the lone one


def test_two_replicas_serving_alternate_blocks_give_the_same_waveform(audio_decoder, redis_url, answer_tokens,
                                                                       offline):
    ns, stream = f"t{uuid.uuid4().hex[:8]}", "tts:alternating"
    blocks = blocks_of(answer_tokens)

    async def main():
        async with decoder_server(audio_decoder, redis_url, ns) as (a, _, _), \
                   decoder_server(audio_decoder, redis_url, ns) as (b, _, _):
            return [await (a, b)[seq % 2].DecodeBlock(block_request(stream, seq, block, seq == len(blocks) - 1))
                    for seq, block in enumerate(blocks)]

    replies = asyncio.run(main())
    assert np.array_equal(np.concatenate([pcm_of(r) for r in replies]), np.concatenate([p for p, _ in offline]))


def test_retried_blocks_return_the_same_pcm_and_the_stream_continues(audio_decoder, redis_url, answer_tokens,
                                                                      offline):
    """Each block is sent twice, the second time to the other replica: after the first reply (a lost
    reply retried), or at the same time as the first (a deadline retried while the first still ran)."""
    ns, stream = f"t{uuid.uuid4().hex[:8]}", "tts:retry"
    blocks = blocks_of(answer_tokens)
    last = len(blocks) - 1

    async def main():
        async with decoder_server(audio_decoder, redis_url, ns) as (a, _, store), \
                   decoder_server(audio_decoder, redis_url, ns) as (b, _, _):
            out = []  # (seq, first reply, stored after it, second reply, stored after it)
            for seq, block in enumerate(blocks):
                request = block_request(stream, seq, block, seq == last)
                if seq == 1:
                    first, again = await asyncio.gather(a.DecodeBlock(request), b.DecodeBlock(request))
                    stored = await store.get(stream)
                    out.append((seq, first, stored, again, stored))
                    continue
                first = await a.DecodeBlock(request)
                stored = await store.get(stream)
                out.append((seq, first, stored, await b.DecodeBlock(request), await store.get(stream)))
            return out

    out = asyncio.run(main())
    for seq, first, stored, again, stored_again in out:
        assert np.array_equal(pcm_of(first), offline[seq][0]) and np.array_equal(pcm_of(again), offline[seq][0])
        assert stored[0] == seq and same_state(stored[1], offline[seq][1])
        assert stored_again == stored  # the retry changed nothing in Redis
        assert sorted([first.state_bytes > 0, again.state_bytes > 0]) == [False, True]  # one stored it


def test_decode_block_errors_have_clear_statuses_and_lose_nothing(audio_decoder, redis_url, answer_tokens, offline):
    ns, stream = f"t{uuid.uuid4().hex[:8]}", "tts:errors"
    blocks = blocks_of(answer_tokens)
    bad = [  # (request, code, words in the message)
        (block_request(stream, 2, blocks[2]), Code.FAILED_PRECONDITION, "is at block 0; block 2 cannot follow"),
        (block_request("tts:never-started", 3, blocks[0]), Code.NOT_FOUND, "unknown or expired"),
        (block_request(stream, 1, [5, 16384, 7]), Code.INVALID_ARGUMENT, "[0, 16384), got [16384]"),
        (block_request(stream, 1, [5, -1]), Code.INVALID_ARGUMENT, "got [-1]"),
        (block_request(stream, 1, []), Code.INVALID_ARGUMENT, "empty block is only allowed as the final"),
        (block_request(stream, 1, blocks[1], ode_steps=51), Code.INVALID_ARGUMENT, "ode_steps must be in 0..50"),
        (block_request(stream, 1, blocks[1], ode_steps=-3), Code.INVALID_ARGUMENT, "got -3"),
        (block_request(stream, 1, list(range(401))), Code.INVALID_ARGUMENT, "at most 400 tokens"),
        (block_request("has space", 0, blocks[0]), Code.INVALID_ARGUMENT, "stream_id must be"),
        (block_request(stream + ":prev", 1, blocks[1]), Code.INVALID_ARGUMENT, "must not end in ':prev'"),
        (block_request(stream, -1, blocks[1]), Code.INVALID_ARGUMENT, "seq must be >= 0"),
        (block_request("tts:short", 0, [1, 2, 3]), Code.INVALID_ARGUMENT, "block too short"),
        (slack(block_request(stream, 1, blocks[1]), -0.5), Code.INVALID_ARGUMENT, "playback_slack_s must be in 0..3600"),
        (slack(block_request(stream, 1, blocks[1]), float("nan")), Code.INVALID_ARGUMENT, "got nan"),
    ]

    async def main():
        async with decoder_server(audio_decoder, redis_url, ns) as (stub, _, store):
            replies = [await stub.DecodeBlock(block_request(stream, 0, blocks[0]))]
            errors = [await rpc_error(stub.DecodeBlock(request)) for request, _, _ in bad]
            short_stored = await store.get("tts:short")
            for seq in range(1, len(blocks)):
                replies.append(await stub.DecodeBlock(block_request(stream, seq, blocks[seq], seq == len(blocks) - 1)))
            errors.append(await rpc_error(stub.DecodeBlock(block_request(stream, 0, blocks[0]))))
            errors.append(await rpc_error(stub.DecodeBlock(block_request(stream, len(blocks), [1] * 20, True))))
            errors.append(await rpc_error(stub.EndStream(decoder_pb2.EndStreamRequest(stream_id="a b"))))
            return replies, errors, short_stored

    replies, errors, short_stored = asyncio.run(main())
    expected = [(code, words) for _, code, words in bad] + [
        (Code.FAILED_PRECONDITION, "block 0 cannot restart it"),
        (Code.FAILED_PRECONDITION, "was finalized"),
        (Code.INVALID_ARGUMENT, "stream_id must be")]
    for err, (code, words) in zip(errors, expected, strict=True):
        assert err.code() == code and words in err.details(), (code, words, err.code(), err.details())
    assert short_stored is None  # a failed block stores nothing
    for reply, (want, _) in zip(replies, offline, strict=True):  # the stream went on untouched
        assert np.array_equal(pcm_of(reply), want)


def test_redis_down_gives_unavailable(audio_decoder, answer_tokens, tmp_path):
    from servers import redis_server

    blocks = blocks_of(answer_tokens)
    with ExitStack() as own_redis:  # this test's own Redis, stopped half way
        url = own_redis.enter_context(redis_server(tmp_path))

        async def main():
            async with decoder_server(audio_decoder, url, "down") as (stub, _, _):
                first = await stub.DecodeBlock(block_request("tts:down", 0, blocks[0]))
                own_redis.close()
                start = time.perf_counter()
                errors = [await rpc_error(stub.DecodeBlock(block_request("tts:down", 1, blocks[1]))),
                          await rpc_error(stub.DecodeBlock(block_request("tts:new", 0, blocks[0]))),
                          await rpc_error(stub.EndStream(decoder_pb2.EndStreamRequest(stream_id="tts:down")))]
                return first, errors, time.perf_counter() - start

        first, errors, seconds = asyncio.run(main())
    assert first.state_bytes > 0
    for err in errors:
        assert err.code() == Code.UNAVAILABLE and "session store unavailable" in err.details(), err.details()
    assert seconds < 10  # bounded retries, not a hang
    print(f"\nRedis down: 3 calls failed UNAVAILABLE in {seconds:.2f} s")


async def _health(channel, service: str):
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))).status


async def _listed_services(channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    async for reply in call:
        return {s.name for s in reply.list_services_response.service}
    return set()


def test_health_serving_then_not_serving_on_drain_and_reflection(audio_decoder, tokenizer, redis_url):
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def check(runner, name):
        channel = _channel(runner.port)
        try:
            before = [await _health(channel, s) for s in ("", name)]
            listed = await _listed_services(channel)
            during = []

            async def on_drain():
                during.extend([await _health(channel, s) for s in ("", name)])

            await runner.drain(0.5, on_drain)
            return before, during, listed
        finally:
            await channel.close()

    async def main():
        async with decoder_server(audio_decoder, redis_url, "health") as (_, runner, _):
            dec = await check(runner, DECODER)
        async with encoder_server(tokenizer) as (_, runner):
            enc = await check(runner, ENCODER)
        return dec, enc

    for (before, during, listed), name in zip(asyncio.run(main()), (DECODER, ENCODER)):
        assert before == [SERVING, SERVING] and during == [NOT_SERVING, NOT_SERVING]
        assert {name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
