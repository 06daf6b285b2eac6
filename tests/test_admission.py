"""Issue 12 item 7, admission control and limits, against real servers (Redis, Triton, encoder,
decoders and gateways on loopback): a full gateway refuses at once, a full queue at every tier
answers RESOURCE_EXHAUSTED, a call's first-message, idle and length limits end it with a clear
status (the session resumable), a stalled reader holds its answer back in bounded memory, and 48 kHz
audio goes out in messages under the size limit."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from test_gateway_e2e import MULAW_8K, Phone, config, history, wait
from test_reliability_e2e import ptt_turn, say

from vitaserve.api import audio_pb2, conversation_pb2 as pb, conversation_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from vitaserve.common.batcher import BatcherFull, MicroBatcher
from vitaserve.common.settings import SettingsError
from vitaserve.gateway.answer import MAX_AUDIO_CHUNK_BYTES, audio_pieces
from vitaserve.gateway.service import MAX_MESSAGE_BYTES
from vitaserve.gateway.settings import GatewaySettings

PCM16_48K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_PCM16, sample_rate=48000)
LONG = audio_pb2.SamplingOptions(greedy=True, repetition_penalty=1.0)  # this tiny checkpoint then speaks long


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def gateway_with(cluster, name: str, *flags: str):
    gateway, servicer = cluster.run(cluster.start_gateway(cluster.decoder_target, name, *flags))
    return gateway, f"127.0.0.1:{gateway.port}"


# ---- pure logic ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size,width", [(0, 2), (1, 1), (MAX_AUDIO_CHUNK_BYTES, 2), (3 * 1024 * 1024 + 6, 2),
                                        (MAX_AUDIO_CHUNK_BYTES * 3 + 1, 1)])
def test_audio_pieces_are_whole_samples_under_the_bound_and_join_back(size, width):
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    pieces = audio_pieces(payload, width)
    assert b"".join(pieces) == payload
    assert all(0 < len(p) <= MAX_AUDIO_CHUNK_BYTES and len(p) % width == 0 for p in pieces[:-1])
    assert len(pieces) == -(-size // (MAX_AUDIO_CHUNK_BYTES - MAX_AUDIO_CHUNK_BYTES % width))


def test_limit_settings_have_flags_and_refuse_nonsense():
    parser = argparse.ArgumentParser()
    GatewaySettings.add_arguments(parser)
    base = ["--lm", "x", "--encoder", "e:1", "--decoder", "d:1", "--triton", "t:1", "--plaintext"]
    env = {"VITA_REDIS_URL": "redis://localhost:6379/0"}
    s = GatewaySettings.from_args(parser.parse_args(base + [
        "--max-calls", "7", "--first-message-s", "1.5", "--idle-s", "3", "--max-call-s", "60",
        "--max-reader-stall-s", "2"]), env)
    assert (s.max_calls, s.first_message_s, s.idle_s, s.max_call_s, s.max_reader_stall_s) == (7, 1.5, 3, 60, 2)
    d = GatewaySettings.from_args(parser.parse_args(base), env)
    assert (d.max_calls, d.first_message_s, d.idle_s, d.max_call_s, d.max_reader_stall_s) == (100, 10, 120, 7200, 30)
    for flag, value in (("--max-calls", "0"), ("--idle-s", "nan"), ("--first-message-s", "0"),
                        ("--max-call-s", "1e9"), ("--max-reader-stall-s", "-1")):
        with pytest.raises(SettingsError, match=flag):
            GatewaySettings.from_args(parser.parse_args(base + [flag, value]), env)


def test_batcher_refuses_beyond_its_queue_at_once():
    """Pure: with the forward held, max_queue requests wait and the next one fails at once with
    BatcherFull; once released, every waiting request gets its result."""
    release = threading.Event()

    def held(values):
        release.wait(10)
        return [v * 2 for v in values]

    async def main():
        batcher = MicroBatcher(held, max_batch=1, max_wait_ms=0, max_queue=2)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(1))
            await asyncio.sleep(0.2)  # taken into the held forward
            waiting = [asyncio.ensure_future(batcher.submit(v)) for v in (2, 3)]
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            with pytest.raises(BatcherFull, match="retry on another replica"):
                await batcher.submit(4)
            refused_in = time.perf_counter() - start
            release.set()
            return await asyncio.gather(first, *waiting), refused_in
        finally:
            release.set()
            await batcher.stop()

    results, refused_in = asyncio.run(main())
    assert results == [2, 4, 6] and refused_in < 0.1


def test_engine_waits_at_most_max_waiting_beyond_its_free_slots(tiny_lm):
    from vitaserve.generator.engine import Engine, EngineFull, Request

    engine = Engine(tiny_lm, max_waiting=1)  # tiny_lm has 4 slots
    for i in range(5):  # 4 take the free slots at the next step, 1 waits
        engine.add(Request(f"r{i}", list(range(40, 50)), "boost", max_new_tokens=4))
    with pytest.raises(EngineFull, match="1 requests already wait"):
        engine.add(Request("r5", list(range(40, 50)), "boost", max_new_tokens=4))
    while engine.has_work():
        engine.step()
    engine.add(Request("r6", list(range(40, 50)), "boost", max_new_tokens=4))  # room again


# ---- the gateway's call limit ----------------------------------------------------------------------

def test_a_full_gateway_refuses_every_rpc_at_once_and_exports_its_limit(cluster, utterance):
    """--max-calls 2: two calls open, a third Converse, a Synthesize and a Transcribe get
    RESOURCE_EXHAUSTED in well under a second, saying to retry elsewhere; the limit, the calls and the
    refusals are exported; when a call ends a new one is admitted."""
    gateway, target = gateway_with(cluster, "gw-full", "--max-calls", "2")
    refused_before = {rpc: metric("vita_gateway_refused_total", rpc=rpc) for rpc in ("converse", "synthesize",
                                                                                   "transcribe")}

    async def open_call() -> tuple[Phone, asyncio.Task]:
        phone = Phone(target)
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True))
        await wait(phone.event("session_started"), 30)
        return phone, task

    async def timed(coro):
        start = time.perf_counter()
        try:
            result = await coro
            return grpc.StatusCode.OK, "", time.perf_counter() - start, result
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details(), time.perf_counter() - start, None

    async def main():
        calls = [await open_call() for _ in range(2)]
        in_use = metric("vita_gateway_calls")
        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            stub = conversation_pb2_grpc.ConversationStub(channel)
            third = Phone(target)  # keeps writing: the refusal, not a half-close, ends it
            third_task = asyncio.create_task(third.run())
            start = time.perf_counter()
            await third.outbox.put(config(push_to_talk=True))
            converse = (await asyncio.wait_for(third_task, 10), third.error and third.error.details(),
                        time.perf_counter() - start)
            synth = await timed(stub.Synthesize(pb.SynthesizeRequest(text="hi")).read())
            transcribe = await timed(stub.Transcribe(pb.TranscribeRequest(audio=b"\xff" * 1600, format=MULAW_8K)))
        phone, task = calls[0]
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        await task
        later = await open_call()  # a place is free again
        for p, t in [calls[1], later]:
            await p.control(pb.Control.HANG_UP)
            await p.outbox.put(None)
            await t
        return converse, synth, transcribe, in_use, later[0]

    try:
        converse, synth, transcribe, in_use, later = asyncio.run(main())
    finally:
        cluster.run(gateway.stop(0))
    for code, details, took in (converse, synth[:3], transcribe[:3]):
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "limit of 2 calls" in details and "another replica" in details
        assert took < 0.5, took
    assert in_use >= 2 and metric("vita_gateway_max_calls") == 2
    for rpc, before in refused_before.items():
        assert metric("vita_gateway_refused_total", rpc=rpc) == before + 1, rpc
    assert later.of("session_started")


# ---- a full queue at the encoder and in the generator ----------------------------------------------

def test_a_full_encoder_queue_answers_resource_exhausted_at_once(cluster, utterance):
    """The real encoder replica with its forward held and room for 2 waiting requests: the next
    Encode gets RESOURCE_EXHAUSTED at once; the waiting ones complete once the forward goes on."""
    from vitaserve.gateway.convert import encoder_pcm16

    batcher = cluster.encoder.batchers[0]
    release, real_fn = threading.Event(), batcher.fn

    def held(waves):
        release.wait(20)
        return real_fn(waves)

    request = encoder_pb2.EncodeRequest(pcm16=encoder_pcm16(utterance[:8000]), sample_rate=8000)

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.encoder.port}") as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            calls = [asyncio.ensure_future(stub.Encode(request, timeout=60))]
            await asyncio.sleep(0.5)  # the first is in the held forward
            calls += [asyncio.ensure_future(stub.Encode(request, timeout=60)) for _ in range(2)]
            await asyncio.sleep(0.5)
            start = time.perf_counter()
            try:
                await stub.Encode(request, timeout=10)
                refused = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as exc:
                refused = exc.code(), exc.details()
            took = time.perf_counter() - start
            release.set()
            return refused, took, await asyncio.gather(*calls)

    batcher.fn, batcher.max_queue = held, 2
    try:
        (code, details), took, done = asyncio.run(main())
    finally:
        release.set()
        batcher.fn, batcher.max_queue = real_fn, 256
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry on another replica" in details, details
    assert took < 0.5
    assert all(r.tokens for r in done)


@pytest.fixture(scope="module")
def small_triton(tmp_path_factory, tiny_lm_dir):
    """A tritonserver whose engine has 1 slot and room for 1 waiting request (config.pbtxt max_waiting)."""
    from vitaserve.devcluster import triton_local
    from vitaserve.devcluster.processes import free_port

    work = tmp_path_factory.mktemp("triton-small")
    repo = triton_local.prepare_model_repository(work / "model_repo", tiny_lm_dir, num_slots=1, max_len=4096)
    cfg = repo / "vita_generator" / "config.pbtxt"
    text = cfg.read_text()
    old = 'key: "max_waiting" value: { string_value: "0" }'
    assert old in text
    cfg.write_text(text.replace(old, 'key: "max_waiting" value: { string_value: "1" }'))
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    proc = triton_local.start_tritonserver(repo, grpc_port, http_port, metrics_port, work / "triton.log")
    try:
        triton_local.wait_ready(proc, http_port, 180)
        yield f"127.0.0.1:{grpc_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except Exception:
            proc.kill()


def test_a_full_generator_queue_answers_resource_exhausted_and_serves_the_others(small_triton):
    """Through Triton: one request runs, one waits, the next is refused at once with
    RESOURCE_EXHAUSTED (the "[CODE] message" contract); when the running one is cancelled the waiting
    one gets the slot, and a later request is served. The running request is far longer than the test
    (4000 tokens) and is cancelled, so no machine is fast enough to free the slot before the refusal."""
    from vitaserve.gateway.generator_client import GenerationOptions, GeneratorClient, GeneratorError

    prompt, long = list(range(40, 60)), GenerationOptions(mode="boost", max_new_tokens=4000, greedy=True)

    async def main():
        client = GeneratorClient(small_triton, token_gap_s=60)
        try:
            running = client.generate(prompt, long)
            await anext(running)  # it holds the only slot now
            waiting = client.generate(prompt, long)
            waiting_first = asyncio.ensure_future(anext(waiting))
            await asyncio.sleep(0.5)  # the waiting request reaches the engine's queue
            queued_meanwhile = not waiting_first.done()
            start = time.perf_counter()
            try:
                async for _ in client.generate(prompt, long):
                    break
                refused = None
            except GeneratorError as exc:
                refused = exc
            took = time.perf_counter() - start
            await running.aclose()  # cancelled in Triton: its slot goes to the waiting request
            first_of_waiting = await asyncio.wait_for(waiting_first, 30)
            await waiting.aclose()
            later = [t async for t in client.generate(prompt, GenerationOptions(mode="boost", max_new_tokens=5,
                                                                                greedy=True))]
            return queued_meanwhile, refused, took, first_of_waiting, later
        finally:
            await client.close()

    queued_meanwhile, refused, took, first_of_waiting, later = asyncio.run(main())
    assert queued_meanwhile, "the second request got tokens while the first still held the only slot"
    assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "wait for a free slot" in str(refused) and took < 1.0, took
    assert first_of_waiting.index == 0 and later[-1].finished and len(later) == 5


# ---- a call's limits -------------------------------------------------------------------------------

def test_a_call_without_a_first_message_ends_with_deadline_exceeded(cluster):
    gateway, target = gateway_with(cluster, "gw-first", "--first-message-s", "0.5")

    async def main():
        phone = Phone(target)  # opens the stream and sends nothing
        start = time.perf_counter()
        code = await asyncio.wait_for(phone.run(), 10)
        return code, phone.error.details(), time.perf_counter() - start

    try:
        code, details, took = asyncio.run(main())
    finally:
        cluster.run(gateway.stop(0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "config" in details, details
    assert 0.5 <= took < 0.5 + 1.0, took


def test_an_idle_call_ends_after_its_answer_played_and_the_session_resumes(cluster, utterance):
    """--idle-s 1: a push-to-talk caller asks one question and then says nothing: the call is not
    ended while the answer is generated or still playing, and ends with DEADLINE_EXCEEDED about 1 s
    after the audio would have finished playing; a new call resumes the session."""
    gateway, target = gateway_with(cluster, "gw-idle", "--idle-s", "1")

    async def main():
        phone = Phone(target)
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True, max_new_tokens=80, sampling=LONG))
        await say(phone, utterance[:8000])
        await wait(phone.event("audio"))
        first_audio = time.perf_counter()
        await wait(phone.event("turn_finished"), 120)
        finished = time.perf_counter()
        code = await asyncio.wait_for(task, 120)
        ended = time.perf_counter()
        resumed = Phone(target)
        resumed_task = asyncio.create_task(resumed.run())
        await resumed.outbox.put(config(push_to_talk=True, session_id=phone.of("session_started")[0].session_id))
        await wait(resumed.event("session_started"))
        await resumed.control(pb.Control.HANG_UP)
        await resumed.outbox.put(None)
        await resumed_task
        return phone, code, (first_audio, finished, ended), resumed

    try:
        phone, code, (first_audio, finished, ended), resumed = asyncio.run(main())
    finally:
        cluster.run(gateway.stop(0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "1 s" in phone.error.details(), phone.error
    assert [f.turn for f in phone.of("turn_finished")] == [1] and not phone.of("error")
    # quiet from the later of the answer's end and the end of its playback (from the first chunk on,
    # as the server counts it); these clocks read a loopback hop (well under 0.2 s) after the server's
    played_until = first_audio + sum(a.duration_s for a in phone.of("audio"))
    quiet_since = max(finished, played_until)
    assert quiet_since + 1.0 - 0.2 <= ended <= quiet_since + 1.0 + 1.0, (ended - quiet_since, played_until - finished)
    (started,) = resumed.of("session_started")
    assert started.resumed and started.turns_so_far == 1


def test_a_call_at_its_longest_length_ends_and_the_session_resumes(cluster, utterance):
    """--max-call-s 3: a caller that keeps talking (VAD, 20 ms frames) sees the call end with
    DEADLINE_EXCEEDED at 3 s, naming its session; a new call resumes it with the turns so far."""
    gateway, target = gateway_with(cluster, "gw-length", "--max-call-s", "3")

    async def main():
        phone = Phone(target)
        task = asyncio.create_task(phone.run())
        start = time.perf_counter()
        await phone.outbox.put(config(max_new_tokens=40))
        talking = asyncio.create_task(phone.speak(np.tile(utterance, 3)))
        code = await asyncio.wait_for(task, 30)
        took = time.perf_counter() - start
        talking.cancel()
        session_id = phone.of("session_started")[0].session_id
        resumed = Phone(cluster.gateway(0))  # a replica with the default limits: a turn outlasts 3 s here
        resumed_task = asyncio.create_task(resumed.run())
        await resumed.outbox.put(config(push_to_talk=True, session_id=session_id))
        await wait(resumed.event("session_started"))
        await ptt_turn(resumed, utterance[:8000], resumed.of("session_started")[0].turns_so_far + 1)
        await resumed.control(pb.Control.HANG_UP)
        await resumed.outbox.put(None)
        return phone, code, took, resumed, await resumed_task, session_id

    try:
        phone, code, took, resumed, resumed_code, session_id = asyncio.run(main())
    finally:
        cluster.run(gateway.stop(0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, phone.error)
    assert "longest length of 3 s" in phone.error.details() and session_id in phone.error.details()
    assert 3.0 <= took < 3.0 + 1.0, took
    assert resumed_code == grpc.StatusCode.OK and resumed.of("session_started")[0].resumed
    assert resumed.of("turn_finished") and not resumed.of("error")


# ---- 48 kHz audio and a slow reader ------------------------------------------------------------------

def unsplit_audio(cluster, gateway, assistant_ids: list[int], plan: str) -> bytes:
    """The answer's audio as one payload per decoder block, decoded again from the tokens the history
    kept, the way gateway.answer does it (deterministic decoder): what the caller must have heard."""
    from vitaserve.common.audio_facts import DECODER_RATE
    from vitaserve.common.resample import StreamResampler
    from vitaserve.gateway.chunker import ChunkPlan, TokenChunker
    from vitaserve.gateway.codecs import encode_audio

    vocab, decoder = gateway.deps.vocab, gateway.deps.decoder
    chunker = TokenChunker(ChunkPlan.parse(plan))
    blocks = chunker.extend(vocab.audio_index(t) for t in assistant_ids if vocab.is_audio(t))
    blocks.append(chunker.flush())

    async def decode():
        out, resampler, stream_id = [], StreamResampler(DECODER_RATE, 48000), f"reference:{uuid.uuid4().hex}"
        for seq, block in enumerate(blocks):
            final = seq == len(blocks) - 1
            pcm = resampler.process(await decoder.decode_block(stream_id, seq, block, final))
            if final:
                pcm = np.concatenate([pcm, resampler.flush()])
            out.append(encode_audio(pcm, "pcm16", 48000) if pcm.size else b"")
        return out

    return cluster.run(decode())


def test_48khz_audio_of_the_largest_blocks_goes_out_under_the_message_limit(cluster, utterance):
    """Output PCM16 at 48 kHz with 200-token blocks (the largest of the presets: 1.5 MB of audio
    each): every AudioChunk is under MAX_AUDIO_CHUNK_BYTES (so every message is far under the 1 MiB
    limit), seq counts 0, 1, 2, ... and the durations add up; joined, the audio equals the unsplit
    audio of the same tokens."""
    gateway, target = gateway_with(cluster, "gw-48k", "--chunk-plan", "200")

    async def main():
        phone = Phone(target)
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True, output_format=PCM16_48K, max_new_tokens=450, sampling=LONG))
        await ptt_turn(phone, utterance[:8000], 1, timeout=600)
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task

    try:
        phone, code = asyncio.run(main())
        assert code == grpc.StatusCode.OK and not phone.of("error"), phone.of("error")
        (turn,) = history(cluster, phone.of("session_started")[0].session_id)
        reference = unsplit_audio(cluster, gateway, turn.assistant_ids, "200")
    finally:
        cluster.run(gateway.stop(0))
    audio = phone.of("audio")
    assert max(len(pb.ConverseResponse(audio=a).SerializeToString()) for a in audio) < MAX_MESSAGE_BYTES
    assert all(len(a.data) <= MAX_AUDIO_CHUNK_BYTES for a in audio)
    assert max(len(block) for block in reference) > MAX_MESSAGE_BYTES  # a block that needed splitting
    assert [a.seq for a in audio] == list(range(len(audio)))
    joined = b"".join(a.data for a in audio)
    assert joined == b"".join(reference)
    assert sum(a.duration_s for a in audio) == pytest.approx(len(joined) / 2 / 48000, rel=1e-9)


async def until(predicate, timeout: float) -> float:
    """Seconds until predicate() held (polled every 50 ms); fails the test after `timeout`."""
    start = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - start < timeout, "timed out"
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


class SlowReader:
    """A Converse caller that reads only when told to, with the HTTP/2 default flow-control window
    (no BDP probing, which would let its gRPC core buffer megabytes the application never read)."""

    def __init__(self, target: str):
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)])
        self.requests: asyncio.Queue = asyncio.Queue()
        self.call = conversation_pb2_grpc.ConversationStub(self.channel).Converse(self._send())
        self.got: list[pb.ConverseResponse] = []

    async def _send(self):
        while (m := await self.requests.get()) is not None:
            yield m

    async def ask(self, utterance: np.ndarray) -> None:
        from test_gateway_e2e import audio_msg

        from vitaserve.gateway.codecs import encode_audio

        for i in range(0, 8000, 1600):
            await self.requests.put(audio_msg(encode_audio(utterance[i : i + 1600], "mulaw", 8000)))
        await self.requests.put(pb.ConverseRequest(control=pb.Control(action=pb.Control.END_OF_UTTERANCE)))

    async def read_until(self, *kinds: str) -> None:
        while not self.got or self.got[-1].WhichOneof("message") not in kinds:
            self.got.append(await self.call.read())

    async def read_to_end(self) -> tuple[grpc.StatusCode, str]:
        try:
            while (m := await self.call.read()) is not grpc.aio.EOF:
                self.got.append(m)
            return grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()

    async def close(self) -> None:
        await self.requests.put(None)
        await self.channel.close()


def test_a_stalled_reader_holds_its_answer_back_in_bounded_memory(cluster, utterance):
    """A caller that stops reading mid-answer holds the answer back: the call's outbox fills to its
    64 messages and stays there (at most 64 x 64 KiB of audio held), and the turn does not finish
    behind its back; when it reads again, the whole answer arrives, in order."""
    from vitaserve.gateway.outbox import MAX_MESSAGES

    gateway, target = gateway_with(cluster, "gw-slow", "--chunk-plan", "200", "--max-reader-stall-s", "300")
    base_held = metric("vita_gateway_outbox_messages")

    async def main():
        caller = SlowReader(target)
        try:
            # 700 tokens: 3 blocks of 200 (24 pieces each at 48 kHz) fill the outbox before the last one
            await caller.requests.put(config(push_to_talk=True, output_format=PCM16_48K, max_new_tokens=700,
                                             sampling=LONG))
            await caller.ask(utterance)
            await caller.read_until("audio")
            filled_in = await until(lambda: metric("vita_gateway_outbox_messages") - base_held >= MAX_MESSAGES, 240)
            held = []
            for _ in range(10):
                await asyncio.sleep(0.2)
                held.append(metric("vita_gateway_outbox_messages") - base_held)
            await caller.read_until("turn_finished", "error")
            await caller.requests.put(pb.ConverseRequest(control=pb.Control(action=pb.Control.HANG_UP)))
            status = await caller.read_to_end()
            return caller.got, held, filled_in, status
        finally:
            await caller.close()

    try:
        got, held, filled_in, status = asyncio.run(main())
    finally:
        cluster.run(gateway.stop(0))
    assert held == [MAX_MESSAGES] * len(held), held  # full, and never more than full
    kinds = [m.WhichOneof("message") for m in got]
    assert "turn_finished" in kinds and "error" not in kinds, kinds
    audio = [m.audio for m in got if m.WhichOneof("message") == "audio"]
    assert len(audio) > MAX_MESSAGES + 2  # the answer was longer than what the gateway held for it
    assert [a.seq for a in audio] == list(range(len(audio)))
    assert all(len(a.data) <= MAX_AUDIO_CHUNK_BYTES for a in audio)
    assert status[0] == grpc.StatusCode.OK, status


def test_a_reader_stalled_too_long_ends_its_call_and_frees_what_it_held(cluster, utterance):
    """--max-reader-stall-s 2: a caller that reads nothing while its answer waits ends its call with
    DEADLINE_EXCEEDED; the call's outbox is emptied, and the session resumes on a new call."""
    stall_s = 2.0
    gateway, target = gateway_with(cluster, "gw-stall", "--max-reader-stall-s", str(stall_s))
    base_held = metric("vita_gateway_outbox_messages")
    base_ended = metric("vita_gateway_call_limits_total", limit="reader_stall")

    async def main():
        caller = SlowReader(target)
        try:
            await caller.requests.put(config(push_to_talk=True, output_format=PCM16_48K, max_new_tokens=80,
                                             sampling=LONG))
            await caller.read_until("session_started")
            await caller.ask(utterance)  # and never read again
            ended_after = await until(
                lambda: metric("vita_gateway_call_limits_total", limit="reader_stall") > base_ended, 120)
            await until(lambda: metric("vita_gateway_outbox_messages") == base_held, 10)
            status = await caller.read_to_end()
        finally:
            await caller.close()
        resumed = Phone(cluster.gateway(0))
        task = asyncio.create_task(resumed.run())
        await resumed.outbox.put(config(push_to_talk=True, session_id=caller.got[0].session_started.session_id))
        await wait(resumed.event("session_started"))
        await resumed.control(pb.Control.HANG_UP)
        await resumed.outbox.put(None)
        await task
        return status, ended_after, resumed

    try:
        (code, details), ended_after, resumed = asyncio.run(main())
    finally:
        cluster.run(gateway.stop(0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "read no message for 2 s" in details, (code, details)
    # the stall clock starts when a write first blocks, after the first block is decoded (seconds here)
    assert ended_after >= stall_s, ended_after
    assert resumed.of("session_started")[0].resumed
