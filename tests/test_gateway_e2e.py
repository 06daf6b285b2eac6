"""The whole pipeline against real servers: Redis, Triton, encoder, decoders and gateways on localhost."""

from __future__ import annotations

import asyncio
import grpc
import numpy as np
import pytest

from vitaserve.api import audio_pb2, conversation_pb2 as pb, conversation_pb2_grpc
from vitaserve.client.scripted_phone import ScriptedPhone as Phone  # a scripted caller: paced audio out, all in
from vitaserve.gateway.codecs import decode_audio, encode_audio


MULAW_8K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_MULAW, sample_rate=8000)


def config(**kw) -> pb.ConverseRequest:
    kw.setdefault("input_format", MULAW_8K)
    kw.setdefault("max_new_tokens", 40)
    kw.setdefault("sampling", audio_pb2.SamplingOptions(greedy=True))
    return pb.ConverseRequest(config=pb.CallConfig(**kw))


async def wait(event: asyncio.Event, timeout: float = 60):
    await asyncio.wait_for(event.wait(), timeout)


def history(cluster, session_id):
    from vitaserve.common.session_store import SessionStore, connect_redis

    async def read():
        store = SessionStore(connect_redis(cluster.redis_url))
        try:
            return await store.history(session_id)
        finally:
            await store.redis.aclose()

    return asyncio.run(read())


def test_two_turn_call_mulaw_8k(cluster, utterance):
    async def main():
        phone = Phone(cluster.gateway(0))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config())
        await phone.speak(utterance)
        await wait(phone.event("turn_finished:1"))
        await phone.speak(utterance)
        await wait(phone.event("turn_finished:2"))
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task

    phone, code = asyncio.run(main())
    assert code == grpc.StatusCode.OK
    (started,) = phone.of("session_started")
    assert not started.resumed and started.output_format.codec == audio_pb2.AUDIO_CODEC_MULAW
    assert [m.turn for m in phone.of("speech_ended")] == [1, 2]
    audio = phone.of("audio")
    assert {a.turn for a in audio} == {1, 2}
    assert all(a.format.codec == audio_pb2.AUDIO_CODEC_MULAW and a.format.sample_rate == 8000 for a in audio)
    assert [a.seq for a in audio if a.turn == 1] == list(range(len([a for a in audio if a.turn == 1])))
    pcm = decode_audio(b"".join(a.data for a in audio if a.turn == 1), "mulaw", 8000)
    assert pcm.size > 8000 * 0.3 and np.abs(pcm).max() > 0  # random weights: noise, but real audio
    finished = phone.of("turn_finished")
    assert [f.turn for f in finished] == [1, 2]
    for f in finished:
        assert f.audio_tokens > 0 and 0 < f.timings.first_audio_ms < f.timings.total_ms
        assert f.timings.encode_ms > 0 and f.mode == "boost"
    turns = history(cluster, started.session_id)
    assert [t.turn for t in turns] == [1, 2] and not any(t.interrupted for t in turns)
    assert all(t.user_audio and t.assistant_ids for t in turns)


def test_barge_in_cancels_and_history_keeps_only_what_was_sent(cluster, utterance):
    async def main():
        phone = Phone(cluster.gateway(0))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(max_new_tokens=900, sampling=audio_pb2.SamplingOptions(
            greedy=True, repetition_penalty=1.0)))
        await phone.speak(utterance)
        await wait(phone.event("audio"))
        await phone.speak(utterance, silence_s=0.2)  # the caller talks over the answer
        await wait(phone.event("interrupted"))
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task

    phone, code = asyncio.run(main())
    assert code == grpc.StatusCode.OK
    (interrupted,) = phone.of("interrupted")
    assert interrupted.turn == 1 and interrupted.audio_chunks_sent >= 1
    turns = history(cluster, phone.of("session_started")[0].session_id)
    assert turns[0].interrupted
    assert 0 < len(turns[0].assistant_ids) < 900
    sent_audio = sum(a.duration_s for a in phone.of("audio") if a.turn == 1)
    assert interrupted.audio_sent_s == pytest.approx(sent_audio, rel=1e-6)


def test_resume_on_another_gateway_continues_history(cluster, utterance):
    async def first_leg():
        phone = Phone(cluster.gateway(0))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config())
        await phone.speak(utterance)
        await wait(phone.event("turn_finished:1"))
        await phone.outbox.put(None)  # the replica "goes away": stream ends without hang-up
        await task
        return phone.of("session_started")[0].session_id

    session_id = asyncio.run(first_leg())

    async def second_leg():
        phone = Phone(cluster.gateway(1))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(session_id=session_id))
        await phone.speak(utterance)
        await wait(phone.event("turn_finished:2"))
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task

    phone, code = asyncio.run(second_leg())
    assert code == grpc.StatusCode.OK
    (started,) = phone.of("session_started")
    assert started.resumed and started.session_id == session_id and started.turns_so_far == 1
    assert [t.turn for t in history(cluster, session_id)] == [1, 2]


def test_synthesize_and_transcribe(cluster, utterance):
    async def main():
        async with grpc.aio.insecure_channel(cluster.gateway(0)) as channel:
            stub = conversation_pb2_grpc.ConversationStub(channel)
            chunks = [r async for r in stub.Synthesize(pb.SynthesizeRequest(
                text="Hello there, how are you?", max_new_tokens=40, sampling=audio_pb2.SamplingOptions(greedy=True),
                output_format=audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_PCM16, sample_rate=16000)))]
            transcript = await stub.Transcribe(pb.TranscribeRequest(
                audio=encode_audio(utterance, "mulaw", 8000), format=MULAW_8K))
            return chunks, transcript

    chunks, transcript = asyncio.run(main())
    assert chunks[-1].WhichOneof("message") == "finished"
    audio = [c.audio for c in chunks[:-1]]
    assert audio and all(a.format.sample_rate == 16000 for a in audio)
    assert chunks[-1].finished.audio_tokens > 0
    assert transcript.audio_tokens_in > 0 and isinstance(transcript.text, str)


def test_decoder_killed_mid_turn_is_survived_by_retry(cluster, utterance):
    async def main():
        phone = Phone(cluster.gateway(0))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(max_new_tokens=260, sampling=audio_pb2.SamplingOptions(
            greedy=True, repetition_penalty=1.0)))
        await phone.speak(utterance)
        await wait(phone.event("audio"))
        await asyncio.to_thread(cluster.kill_decoder, 0)
        await wait(phone.event("turn_finished:1"), 120)
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return phone, await task

    phone, code = asyncio.run(main())
    assert code == grpc.StatusCode.OK
    assert not phone.of("error"), phone.of("error")
    (finished,) = phone.of("turn_finished")
    assert len(phone.of("audio")) >= 3  # blocks after the kill were decoded by the other replica


async def call_with(target: str, messages: list[pb.ConverseRequest], pace_s: float = 0.0):
    """Send the messages (then half-close); return (status code, details, server messages)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = conversation_pb2_grpc.ConversationStub(channel)

        async def requests():
            for m in messages:
                yield m
                if pace_s:
                    await asyncio.sleep(pace_s)

        got = []
        try:
            async for msg in stub.Converse(requests()):
                got.append(msg)
            return grpc.StatusCode.OK, "", got
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details(), got


def audio_msg(data: bytes) -> pb.ConverseRequest:
    return pb.ConverseRequest(audio=pb.AudioFrame(data=data))


PCM16_16K = audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_PCM16, sample_rate=16000)


@pytest.mark.parametrize("name,messages,code,words", [
    ("audio before config", [audio_msg(b"\xff" * 160)], grpc.StatusCode.INVALID_ARGUMENT, "first message"),
    ("no codec", [config(input_format=audio_pb2.AudioFormat(sample_rate=8000))],
     grpc.StatusCode.INVALID_ARGUMENT, "codec"),
    ("mu-law at 16 kHz", [config(input_format=audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_MULAW,
                                                                    sample_rate=16000))],
     grpc.StatusCode.INVALID_ARGUMENT, "8000"),
    ("pcm16 at 11025", [config(input_format=audio_pb2.AudioFormat(codec=audio_pb2.AUDIO_CODEC_PCM16,
                                                                  sample_rate=11025))],
     grpc.StatusCode.INVALID_ARGUMENT, "11025"),
    ("odd-length pcm16", [config(input_format=PCM16_16K), audio_msg(b"\x00" * 641)],
     grpc.StatusCode.INVALID_ARGUMENT, "odd"),
    ("config twice", [config(), config()], grpc.StatusCode.INVALID_ARGUMENT, "once"),
    ("bad mode", [config(mode="1,11")], grpc.StatusCode.INVALID_ARGUMENT, "MCTP modules"),
    ("unknown mode name", [config(mode="warp")], grpc.StatusCode.INVALID_ARGUMENT, "unknown inference mode"),
    ("unknown session", [config(session_id="0" * 32)], grpc.StatusCode.NOT_FOUND, "session"),
    ("malformed session", [config(session_id="../etc")], grpc.StatusCode.INVALID_ARGUMENT, "session"),
    ("oversized message", [config(), audio_msg(b"\xff" * (2 * 1024 * 1024))], grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ("frame too big", [config(), audio_msg(b"\xff" * 100_000)], grpc.StatusCode.INVALID_ARGUMENT, "frame"),
    ("faster than real time", [config()] + [audio_msg(b"\xff" * 8000)] * 5,
     grpc.StatusCode.RESOURCE_EXHAUSTED, "real time"),
])
def test_bad_input_gets_a_clear_status(cluster, name, messages, code, words):
    got_code, details, _ = asyncio.run(call_with(cluster.gateway(0), messages))
    assert got_code == code, (name, got_code, details)
    assert words.lower() in details.lower()


def test_push_to_talk_turn_longer_than_the_maximum(cluster):
    second = encode_audio(np.zeros(8000, np.float32), "mulaw", 8000)  # 1 s per message, paced to 1 s
    messages = [config(push_to_talk=True)] + [audio_msg(second[i : i + 4000]) for i in range(0, 8000, 4000)] * 10
    code, details, _ = asyncio.run(call_with(cluster.gateway(0), messages, pace_s=0.45))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "longer than 8" in details


def test_bad_input_loses_nothing_else(cluster, utterance):
    """A broken call next to a good one: the good call finishes its turn untouched."""

    async def main():
        phone = Phone(cluster.gateway(0))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config(push_to_talk=True))
        bad = asyncio.create_task(call_with(cluster.gateway(0), [config(), audio_msg(b"\xff" * 100_000)]))
        await phone.speak(utterance, silence_s=0.1, realtime=1.0)
        await phone.control(pb.Control.END_OF_UTTERANCE)
        await wait(phone.event("turn_finished:1"))
        await phone.control(pb.Control.HANG_UP)
        await phone.outbox.put(None)
        return await bad, phone, await task

    (bad_code, _, _), phone, code = asyncio.run(main())
    assert bad_code == grpc.StatusCode.INVALID_ARGUMENT
    assert code == grpc.StatusCode.OK and phone.of("turn_finished") and not phone.of("error")


def test_metrics_move(cluster, utterance):
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before_turns = value("vita_gateway_turns_total", outcome="completed")
    before_first = value("vita_gateway_first_audio_ms_count", mode="boost")
    before_batches = value("vita_encoder_batch_size_count")
    before_slack = value("vita_decoder_playback_slack_s_count"), value("vita_decoder_playback_slack_s_sum")
    test_two_turn_call_mulaw_8k(cluster, utterance)
    assert value("vita_gateway_turns_total", outcome="completed") == before_turns + 2
    assert value("vita_gateway_first_audio_ms_count", mode="boost") == before_first + 2
    assert value("vita_encoder_batch_size_count") >= before_batches + 2
    assert value("vita_gateway_active_streams") == 0
    assert value("vita_decoder_block_ms_count", first="true") > 0
    # later blocks were requested with the audio the caller still had to play (what orders the decoder)
    assert value("vita_decoder_playback_slack_s_count") > before_slack[0]
    assert value("vita_decoder_playback_slack_s_sum") > before_slack[1]


# ---- the gateway's settings, its outbox and its start/stop, as a pod runs them -------------------
def gateway_args(*extra: str):
    import argparse

    from vitaserve.gateway.settings import GatewaySettings

    parser = argparse.ArgumentParser()
    GatewaySettings.add_arguments(parser)
    return parser.parse_args(["--lm", "lm", "--encoder", "e:1", "--decoder", "d:1", "--triton", "t:1",
                              "--plaintext", *extra])


def test_gateway_settings_read_the_redis_url_from_the_environment_never_argv(tmp_path):
    from vitaserve.common.settings import SettingsError
    from vitaserve.gateway.settings import GatewaySettings

    secret = tmp_path / "redis-url"
    secret.write_text("redis://:s3cret@redis:6379/0\n")
    settings = GatewaySettings.from_args(
        gateway_args("--chunk-plan", "10,25", "--max-utterance-s", "12", "--max-new-tokens", "300"),
        {"VITA_REDIS_URL_FILE": str(secret)})
    assert settings.redis_url == "redis://:s3cret@redis:6379/0" and "s3cret" not in repr(settings)
    assert settings.chunk_plan.sizes == (10, 25) and settings.max_utterance_s == 12 and settings.max_new_tokens == 300
    with pytest.raises(SystemExit):
        gateway_args("--redis", "redis://:s3cret@redis:6379/0")
    with pytest.raises(SettingsError, match="VITA_REDIS_URL"):
        GatewaySettings.from_args(gateway_args(), {})
    with pytest.raises(SettingsError, match="--chunk-plan"):
        GatewaySettings.from_args(gateway_args("--chunk-plan", "fast"), {"VITA_REDIS_URL": "redis://r"})
    with pytest.raises(SettingsError, match="--max-utterance-s"):
        GatewaySettings.from_args(gateway_args("--max-utterance-s", "0"), {"VITA_REDIS_URL": "redis://r"})


def test_outbox_holds_a_slow_reader_back_keeps_order_and_never_blocks_a_cancelled_answer():
    from contextlib import aclosing

    from vitaserve.gateway.outbox import Outbox

    async def main():
        outbox, put = Outbox(4), []

        async def answer():
            for i in range(20):
                await outbox.put(i)
                put.append(i)

        got = []
        async with aclosing(outbox.drain(answer())) as messages:
            async for message in messages:
                got.append(message)
                if message == 0:  # a slow reader: the answer waits for it
                    await asyncio.sleep(0.05)
                    assert len(put) <= 5
        assert got == list(range(20))

        outbox, interrupted = Outbox(2), asyncio.Event()

        async def endless_answer():
            try:
                while True:
                    await outbox.put("audio")
            except asyncio.CancelledError:  # barge-in's Interrupted, put into a full outbox
                await outbox.put("interrupted")
                interrupted.set()
                raise

        async with aclosing(outbox.drain(endless_answer())) as messages:
            async for _ in messages:
                break  # the caller went away
        assert interrupted.is_set()

        async def failing():
            await outbox.put("before")
            raise ValueError("decoder down")

        outbox = Outbox()
        seen = []
        with pytest.raises(ValueError, match="decoder down"):
            async for message in outbox.drain(failing()):
                seen.append(message)
        assert seen == ["before"]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_stopped_gateway_closes_its_clients_and_shares_one_vad_model(cluster):
    from servers import free_port

    gateway, _ = cluster.run(cluster.start_gateway(f"127.0.0.1:{free_port()}", replica_id="gw-close"))
    deps = gateway.deps
    assert deps.vad_model is cluster.gateways[0].deps.vad_model  # loaded once, at start-up
    cluster.run(gateway.stop(0))
    assert deps.encoder.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    assert deps.decoder.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
