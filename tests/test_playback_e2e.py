"""Playback acknowledgement on a real in-process cluster (Redis, Triton, encoder, decoders, gateway):
an answer cancelled after the caller reported 0.4 s played is stored cut at its 5th audio token; the
same answer cancelled without a report is stored as sent; bad reports get Error{INVALID_ARGUMENT}
and change nothing."""

from __future__ import annotations

import asyncio
import math

import grpc

from test_gateway_e2e import config, history, wait
from vitaserve.api import audio_pb2, conversation_pb2 as pb
from vitaserve.client.scripted_phone import ScriptedPhone as Phone
from vitaserve.gateway.playback import heard_ids

PLAYED_S = 0.4  # x 12.5 tokens/s = 5 audio tokens


def playback(turn: int, seq: int, played_s: float) -> pb.ConverseRequest:
    return pb.ConverseRequest(playback=pb.PlaybackProgress(turn=turn, seq=seq, played_s=played_s))


async def audio_until(phone: Phone, seconds: float, timeout_s: float = 60) -> list[pb.AudioChunk]:
    """The answer's chunks once they hold `seconds` of audio. The streaming decoder holds back the
    tail of each block's speech until the next block, so the first block (10 tokens) brings less
    than its 0.8 s: wait for the sum, not for one chunk."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        chunks = phone.of("audio")
        if sum(c.duration_s for c in chunks) >= seconds:
            return chunks
        assert loop.time() < deadline, f"no {seconds} s of audio within {timeout_s} s"
        await asyncio.sleep(0.02)


def playing_at(chunks: list[pb.AudioChunk], played_s: float) -> int:
    """seq of the chunk the caller is playing `played_s` into the turn's audio."""
    end = 0.0
    for chunk in chunks:
        end += chunk.duration_s
        if played_s <= end:
            return chunk.seq
    raise AssertionError(f"{played_s} s is past the {end} s sent")


async def cancelled_answer(cluster, utterance, reports) -> tuple[Phone, grpc.StatusCode]:
    """Push-to-talk turn 1 with a long greedy answer; once 0.4 s of audio arrived the caller sends
    `reports(chunks received)` and then CANCEL. Push-to-talk and greedy sampling make both calls of the
    test generate the same ids."""
    phone = Phone(cluster.gateway(0))
    task = asyncio.create_task(phone.run())
    await phone.outbox.put(config(push_to_talk=True, max_new_tokens=900, sampling=audio_pb2.SamplingOptions(
        greedy=True, repetition_penalty=1.0)))
    await phone.speak(utterance, silence_s=0.1)
    await phone.control(pb.Control.END_OF_UTTERANCE)
    chunks = await audio_until(phone, PLAYED_S)
    for report in reports(chunks):
        await phone.outbox.put(report)
    await phone.control(pb.Control.CANCEL)
    await wait(phone.event("interrupted"))
    await phone.control(pb.Control.HANG_UP)
    await phone.outbox.put(None)
    return phone, await task


def stored_turn(cluster, phone):
    (turn,) = history(cluster, phone.of("session_started")[0].session_id)
    return turn


def test_an_interrupted_answer_is_stored_as_far_as_the_caller_reported_playing_it(cluster, utterance):
    is_audio = cluster.gateways[0].deps.vocab.is_audio

    # without a report: what was sent (whole decoder blocks)
    silent, code = asyncio.run(cancelled_answer(cluster, utterance, lambda first: []))
    assert code == grpc.StatusCode.OK and not silent.of("error")
    sent = stored_turn(cluster, silent)
    assert sent.interrupted
    sent_audio = [i for i in sent.assistant_ids if is_audio(i)]
    assert len(sent_audio) >= 10  # at least the first block went out

    # with a report of 0.4 s, and bad reports after it that must change nothing
    def reports(chunks: list[pb.AudioChunk]) -> list[pb.ConverseRequest]:
        assert {c.turn for c in chunks} == {1}
        return [playback(1, playing_at(chunks, PLAYED_S), PLAYED_S),
                playback(2, 0, 0.1),                      # a turn not begun
                playback(0, 0, 0.1),                      # no such turn
                playback(1, 10_000, 0.1),                 # a chunk not sent
                playback(1, 0, -1.0),
                playback(1, 0, math.nan),
                playback(1, 0, 1e6)]                      # more than was sent

    heard, code = asyncio.run(cancelled_answer(cluster, utterance, reports))
    assert code == grpc.StatusCode.OK  # bad reports never end the call
    errors = heard.of("error")
    assert len(errors) == 6 and all(e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for e in errors)
    assert all("playback." in e.message for e in errors)
    assert [e.turn for e in errors] == [2, 0, 1, 1, 1, 1]
    stored = stored_turn(cluster, heard)
    assert stored.interrupted
    assert [i for i in stored.assistant_ids if is_audio(i)] == sent_audio[:5]
    assert stored.assistant_ids == heard_ids(sent.assistant_ids, is_audio, 5)  # and the text before them
    assert is_audio(stored.assistant_ids[-1])


# ---- an answer that finished generating while the caller still played it ----------------------------
# Generation runs faster than real time, so on a phone the answer is usually stored whole (TurnFinished)
# seconds before the caller stops hearing it. FINISHED_ANSWER_TOKENS keeps the answer short to generate
# and still seconds long to play (greedy, the same ids every call): at 0.4 s played, seconds are unplayed,
# far more than the few ms between the report and the CANCEL, so the cut is certain, not a race.
FINISHED_ANSWER_TOKENS = 120


async def finished_answer(cluster, utterance, reports) -> tuple[Phone, grpc.StatusCode]:
    """Push-to-talk turn 1, answered to its end (TurnFinished); then the caller sends
    `reports(all its chunks)` and CANCEL, then hangs up."""
    phone = Phone(cluster.gateway(0))
    task = asyncio.create_task(phone.run())
    await phone.outbox.put(config(push_to_talk=True, max_new_tokens=FINISHED_ANSWER_TOKENS,
                                  sampling=audio_pb2.SamplingOptions(greedy=True, repetition_penalty=1.0)))
    await phone.speak(utterance, silence_s=0.1)
    await phone.control(pb.Control.END_OF_UTTERANCE)
    await wait(phone.event("turn_finished"), timeout=300)
    for report in reports(phone.of("audio")):
        await phone.outbox.put(report)
    await phone.control(pb.Control.CANCEL)
    await phone.control(pb.Control.HANG_UP)
    await phone.outbox.put(None)
    return phone, await task


def test_a_finished_answer_barged_in_on_while_playing_is_stored_as_far_as_it_was_heard(cluster, utterance):
    is_audio = cluster.gateways[0].deps.vocab.is_audio

    # without a report: stored whole, as generated; nothing says interrupted
    silent, code = asyncio.run(finished_answer(cluster, utterance, lambda chunks: []))
    assert code == grpc.StatusCode.OK and not silent.of("error") and not silent.of("interrupted")
    whole = stored_turn(cluster, silent)
    assert not whole.interrupted
    whole_audio = [i for i in whole.assistant_ids if is_audio(i)]
    sent_s = sum(c.duration_s for c in silent.of("audio"))
    assert len(whole_audio) > 10 and sent_s > 2 * PLAYED_S  # seconds left to play after 0.4 s

    # 0.4 s played, a report that cannot be true after it (more than was sent: refused, changes nothing)
    def reports(chunks: list[pb.AudioChunk]) -> list[pb.ConverseRequest]:
        return [playback(1, playing_at(chunks, PLAYED_S), PLAYED_S),
                playback(1, 0, sum(c.duration_s for c in chunks) + 1.0)]

    heard, code = asyncio.run(finished_answer(cluster, utterance, reports))
    assert code == grpc.StatusCode.OK
    (error,) = heard.of("error")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "exceeds" in error.message
    (interrupted,) = heard.of("interrupted")  # the caller hears its turn 1 was cut
    assert interrupted.turn == 1 and interrupted.audio_chunks_sent == len(heard.of("audio"))
    stored = stored_turn(cluster, heard)
    assert stored.interrupted and stored.user_audio == whole.user_audio
    assert [i for i in stored.assistant_ids if is_audio(i)] == whole_audio[:5]
    assert stored.assistant_ids == heard_ids(whole.assistant_ids, is_audio, 5)  # and the text before them
    assert is_audio(stored.assistant_ids[-1])

    # all of it played: stored whole
    played_all, code = asyncio.run(finished_answer(cluster, utterance, lambda chunks: [
        playback(1, chunks[-1].seq, sum(c.duration_s for c in chunks))]))
    assert code == grpc.StatusCode.OK and not played_all.of("error") and not played_all.of("interrupted")
    assert stored_turn(cluster, played_all) == whole
