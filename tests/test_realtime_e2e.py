"""The OpenAI Realtime adapter on a real in-process cluster (Redis, Triton, encoder, decoders) and a
gateway serving --realtime-port with an API keys file; the client is the official `openai` SDK's
realtime client (AsyncOpenAI(...).realtime.connect, and .beta.realtime.connect once), pointed at it.

Proves: a two-turn call under server VAD gets PCM audio and its transcript back in the GA events; a
push-to-talk call (turn_detection null, commit, response.create); a barge-in whose
conversation.item.truncate cuts the stored turn where audio_end_ms says; the beta schema's names; every
bad input answered the protocol's way (an `error` event and the session goes on, or a close code),
with Redis left as it was; a client gone mid-answer leaves its session resumable."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from test_gateway_e2e import history
from vitaserve.client.realtime_phone import run_realtime_call
from vitaserve.common import metrics
from vitaserve.common.audio_facts import TOKENS_PER_SECOND
from vitaserve.common.resample import resample
from vitaserve.devcluster.processes import free_port
from vitaserve.gateway.codecs import decode_audio, encode_audio
from vitaserve.gateway.playback import heard_ids, tokens_heard

API_KEY = "vk_test_realtime_key"
RATE = 24000
FRAME = 480  # 20 ms at 24 kHz


@pytest.fixture(scope="module")
def realtime_gateway(cluster, tmp_path_factory):
    keys = tmp_path_factory.mktemp("rt-keys") / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "rt", "tenant": "acme",
                                          "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]}))
    gateway, _ = cluster.run(cluster.start_gateway(cluster.decoder_target, "gw-realtime", "--realtime-port",
                                                   str(free_port()), environ={"VITA_API_KEYS_FILE": str(keys)}))
    try:
        yield gateway
    finally:
        cluster.run(gateway.stop(0))


def client(gateway, key: str = API_KEY) -> AsyncOpenAI:
    # the beta client always dials wss:// of base_url; websocket_base_url is the SDK's way to say ws://
    base = f"127.0.0.1:{gateway.realtime.port}/v1"
    return AsyncOpenAI(base_url=f"http://{base}", websocket_base_url=f"ws://{base}", api_key=key)


def pcm24k(samples_8k: np.ndarray, silence_s: float = 1.0) -> bytes:
    x = resample(samples_8k.astype(np.float32), 8000, RATE)
    return encode_audio(np.concatenate([np.zeros(RATE // 5, np.float32), x,
                                        np.zeros(int(silence_s * RATE), np.float32)]), "pcm16", RATE)


class Caller:
    """The SDK connection, every event it receives kept, and audio paced in real time."""

    def __init__(self, conn):
        self.conn = conn
        self.events: list = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            async for event in self.conn:
                self.events.append(event)
                self.changed.set()

    async def speak(self, audio: bytes) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        step = FRAME * 2
        for i, offset in enumerate(range(0, len(audio), step)):
            await self.conn.input_audio_buffer.append(audio=base64.b64encode(audio[offset:offset + step]).decode())
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))

    def of(self, kind: str) -> list:
        return [e for e in self.events if e.type == kind]

    async def until(self, predicate, timeout_s: float = 90) -> None:
        """Until `predicate()` holds, checked at each event and every 50 ms; a timeout names the events."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), 0.05)
        except TimeoutError:
            raise AssertionError(f"timed out; events: {[e.type for e in self.events]}") from None

    def audio(self, kind: str = "response.output_audio.delta") -> bytes:
        return b"".join(base64.b64decode(e.delta) for e in self.of(kind))


def test_two_turn_call_with_server_vad_gets_pcm_audio_and_transcript(cluster, utterance, realtime_gateway):
    async def main():
        async with client(realtime_gateway).realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            await conn.session.update(session={"type": "realtime", "instructions": "You are a helpful voice.",
                                               "max_output_tokens": 40, "audio": {
                                                   "input": {"format": {"type": "audio/pcm", "rate": RATE},
                                                             "turn_detection": {"type": "server_vad",
                                                                                "silence_duration_ms": 500}},
                                                   "output": {"format": {"type": "audio/pcm", "rate": RATE}}}})
            await caller.until(lambda: caller.of("session.updated"))
            for turn in (1, 2):
                await caller.speak(pcm24k(utterance))
                await caller.until(lambda: len(caller.of("response.done")) >= turn)
            await conn.close()
            return caller

    caller = asyncio.run(main())
    kinds = [e.type for e in caller.events]
    assert kinds[0] == "session.created" and "error" not in kinds, kinds
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "response.created"):
        assert len(caller.of(kind)) == 2, kind
    done = caller.of("response.done")
    assert [d.response.status for d in done] == ["completed", "completed"]
    usage = done[0].response.usage
    assert usage.output_tokens == usage.output_token_details.text_tokens + usage.output_token_details.audio_tokens > 0
    assert usage.input_tokens > 0
    # a user item and an assistant item per turn, announced with conversation.item.added
    roles = [e.item.role for e in caller.of("conversation.item.added")]
    assert roles == ["user", "assistant", "user", "assistant"]
    pcm = decode_audio(caller.audio(), "pcm16", RATE)
    assert pcm.size > RATE * 0.6 and np.abs(pcm).max() > 0
    # the transcript deltas add up to each answer's whole text in response.done
    transcript = "".join(e.delta for e in caller.of("response.output_audio_transcript.delta"))
    assert transcript == "".join(d.response.output[0].content[0].transcript for d in done)
    session_id = done[0].response.conversation_id
    turns = history(cluster, session_id)
    assert [t.turn for t in turns] == [1, 2] and not any(t.interrupted for t in turns)


def test_push_to_talk_commit_and_response_create(cluster, utterance, realtime_gateway):
    async def main():
        async with client(realtime_gateway).realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 40, "audio": {
                "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
                "output": {"format": {"type": "audio/pcmu"}}}})
            speech = encode_audio(np.concatenate([np.zeros(1600, np.float32), utterance]), "mulaw", 8000)
            for turn in (1, 2):
                loop = asyncio.get_running_loop()
                start = loop.time()
                for i, offset in enumerate(range(0, len(speech), 160)):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(speech[offset:offset + 160]).decode())
                    await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
                await conn.input_audio_buffer.commit()
                await conn.response.create()
                await caller.until(lambda: len(caller.of("response.done")) >= turn)
                if turn == 1:  # bad events mid-call: answered with errors, the call and its history go on
                    for frame in ("{not json", '{"type": "hello"}', '{"type": "input_audio_buffer.append", "audio": 5}',
                                  '{"type": "response.cancel"}'):
                        await conn.send_raw(frame)
                    await caller.until(lambda: len(caller.of("error")) >= 4)
            await conn.close()
            return caller

    caller = asyncio.run(main())
    assert [e.error.code for e in caller.of("error")] == ["invalid_json", "invalid_event", "invalid_value",
                                                          "response_cancel_not_active"]
    assert not caller.of("input_audio_buffer.speech_started")
    assert len(caller.of("input_audio_buffer.committed")) == 2
    assert [d.response.status for d in caller.of("response.done")] == ["completed"] * 2
    mulaw = caller.audio()
    assert len(mulaw) > 8000 * 0.6 and np.abs(decode_audio(mulaw, "mulaw", 8000)).max() > 0
    turns = history(cluster, caller.of("response.done")[0].response.conversation_id)
    assert [t.turn for t in turns] == [1, 2]


def test_response_cancel_before_the_answer_begins_leaves_no_turn_and_the_call_goes_on(cluster, utterance,
                                                                                       realtime_gateway):
    speech = encode_audio(np.concatenate([np.zeros(1600, np.float32), utterance]), "mulaw", 8000)

    async def main():
        async with client(realtime_gateway).realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 40, "audio": {
                "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}}})
            for cancel in (True, False):
                loop = asyncio.get_running_loop()
                start = loop.time()
                for i, offset in enumerate(range(0, len(speech), 160)):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(speech[offset:offset + 160]).decode())
                    await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
                await conn.input_audio_buffer.commit()
                await conn.response.create()
                if cancel:  # at once: the call drops the utterance it was about to answer
                    await conn.response.cancel()
                    await asyncio.sleep(1.0)
            await caller.until(lambda: caller.of("response.done"))
            await conn.close()
            return caller

    caller = asyncio.run(main())
    assert not caller.of("error"), [e.error.message for e in caller.of("error")]
    done = caller.of("response.done")
    assert len(caller.of("response.created")) == len(done) == 1 and done[0].response.status == "completed"
    turns = history(cluster, done[0].response.conversation_id)
    assert [t.turn for t in turns] == [1]  # the cancelled request took no turn


def test_barge_in_and_truncate_cut_the_stored_turn_where_audio_end_ms_says(cluster, utterance, realtime_gateway):
    is_audio = realtime_gateway.deps.vocab.is_audio

    async def main():
        async with client(realtime_gateway).realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 900})
            await caller.speak(pcm24k(utterance))
            await caller.until(lambda: len(caller.of("response.output_audio.delta")) >= 2)
            first = caller.of("response.output_audio.delta")[0]
            heard_ms = int(len(base64.b64decode(first.delta)) / 2 / RATE * 1000)  # the first chunk played
            talking = asyncio.create_task(caller.speak(pcm24k(utterance, silence_s=0.3)))  # talks over it
            await caller.until(lambda: len(caller.of("input_audio_buffer.speech_started")) >= 2)
            # the SDK's client stops playback at speech_started and tells the server what was heard
            await conn.conversation.item.truncate(item_id=first.item_id, content_index=0, audio_end_ms=heard_ms)
            await caller.until(lambda: caller.of("conversation.item.truncated") or caller.of("error"))
            await talking
            await conn.close()
            return caller, heard_ms

    caller, heard_ms = asyncio.run(main())
    assert not caller.of("error"), [e.error.message for e in caller.of("error")]
    done = caller.of("response.done")
    # cancelled by the barge-in, or (a fast machine) finished and then cut: truncate cuts either
    assert done[0].response.status in ("cancelled", "completed")
    truncated = caller.of("conversation.item.truncated")[0]
    assert truncated.audio_end_ms == heard_ms
    turns = history(cluster, done[0].response.conversation_id)
    assert turns[0].interrupted
    stored_audio = [i for i in turns[0].assistant_ids if is_audio(i)]
    assert len(stored_audio) == tokens_heard(heard_ms / 1000) > 0
    assert turns[0].assistant_ids == heard_ids(turns[0].assistant_ids, is_audio, tokens_heard(heard_ms / 1000))
    first_item = done[0].response.output[0].id
    sent_s = sum(len(base64.b64decode(e.delta)) for e in caller.of("response.output_audio.delta")
                 if e.item_id == first_item) / 2 / RATE
    assert len(stored_audio) < sent_s * TOKENS_PER_SECOND  # cut at audio_end_ms, not at what was sent


def test_a_session_update_mid_call_goes_on_in_the_same_session_with_the_new_settings(cluster, utterance,
                                                                                      realtime_gateway):
    async def main():
        async with client(realtime_gateway).realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 40})
            await caller.speak(pcm24k(utterance))
            await caller.until(lambda: caller.of("response.done"))
            # to push-to-talk, mu-law in, another persona: the call hands over to one with this config
            await conn.session.update(session={"type": "realtime", "instructions": "Answer in one word.", "audio": {
                "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}}})
            await caller.until(lambda: len(caller.of("session.updated")) >= 2)
            speech = encode_audio(np.concatenate([np.zeros(1600, np.float32), utterance]), "mulaw", 8000)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i, offset in enumerate(range(0, len(speech), 160)):
                await conn.input_audio_buffer.append(audio=base64.b64encode(speech[offset:offset + 160]).decode())
                await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            await caller.until(lambda: len(caller.of("response.done")) >= 2)
            await conn.close()
            return caller

    caller = asyncio.run(main())
    assert not caller.of("error"), [e.error.message for e in caller.of("error")]
    updated = caller.of("session.updated")[-1].session
    assert updated.audio.input.turn_detection is None and updated.instructions == "Answer in one word."
    done = caller.of("response.done")
    assert [d.response.status for d in done] == ["completed", "completed"]
    assert done[0].response.conversation_id == done[1].response.conversation_id
    assert [t.turn for t in history(cluster, done[0].response.conversation_id)] == [1, 2]


def test_beta_schema_names(cluster, utterance, realtime_gateway):
    async def main():
        async with client(realtime_gateway).beta.realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            await conn.session.update(session={"input_audio_format": "g711_ulaw", "output_audio_format": "pcm16",
                                               "turn_detection": None, "max_response_output_tokens": 40})
            speech = encode_audio(np.concatenate([np.zeros(1600, np.float32), utterance]), "mulaw", 8000)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i, offset in enumerate(range(0, len(speech), 160)):
                await conn.input_audio_buffer.append(audio=base64.b64encode(speech[offset:offset + 160]).decode())
                await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            await caller.until(lambda: caller.of("response.done"))
            await conn.close()
            return caller

    caller = asyncio.run(main())
    kinds = {e.type for e in caller.events}
    # a sampled answer of the tiny model may hold no text (then no transcript delta): the done event
    # always comes, and test_realtime_units checks the delta's beta name
    assert {"response.audio.delta", "response.audio_transcript.done", "conversation.item.created"} <= kinds, kinds
    assert not kinds & {"response.output_audio.delta", "response.output_audio_transcript.delta",
                        "response.output_audio_transcript.done", "conversation.item.added", "error"}, kinds
    assert caller.of("session.updated")[0].session.input_audio_format == "g711_ulaw"
    pcm = decode_audio(caller.audio("response.audio.delta"), "pcm16", RATE)
    assert pcm.size > RATE * 0.6


def _keys(cluster) -> set[bytes]:
    import redis.asyncio as redis

    async def size():
        r = redis.from_url(cluster.redis_url)
        try:
            return set(await r.keys("*"))
        finally:
            await r.aclose()
    return asyncio.run(size())


GOOD_UPDATE = {"type": "session.update", "session": {"type": "realtime"}}
# (raw frames sent, the error code of the `error` event the session answers before going on)
BAD_EVENTS = [
    (["{not json"], "invalid_json"),
    ([b"\x00\x01"], "invalid_event"),
    (['["session.update"]'], "invalid_event"),
    (['{"type": "hello"}'], "invalid_event"),
    (['{"type": "conversation.item.create", "item": {}}'], "unsupported_event"),
    ([json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "format": {"type": "audio/opus"}}}}})], "invalid_value"),
    ([json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}}}}})], "invalid_value"),
    ([json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "threshold": 2}}}}})], "invalid_value"),
    ([json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "semantic_vad"}}}}})], "invalid_value"),
    (['{"type": "input_audio_buffer.append", "audio": "%%%"}'], "invalid_value"),
    (['{"type": "input_audio_buffer.commit"}'], "input_audio_buffer_commit_empty"),
    (['{"type": "response.cancel"}'], "response_cancel_not_active"),
    (['{"type": "response.create"}'], "not_supported_with_vad"),
    (['{"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 10}'],
     "item_not_found"),
    (['{"type": "conversation.item.truncate", "item_id": "item_x", "audio_end_ms": -1}'], "invalid_value"),
]


def test_every_bad_event_gets_an_error_event_and_the_session_goes_on(cluster, realtime_gateway):
    async def one(frames):
        async with client(realtime_gateway).realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            await caller.until(lambda: caller.of("session.created"))
            for frame in frames:
                await conn.send_raw(frame)
            await caller.until(lambda: caller.of("error"), 30)
            await conn.send(GOOD_UPDATE)  # the session goes on
            await caller.until(lambda: caller.of("session.updated"), 30)
            await conn.close()
            return caller.of("error")

    before = _keys(cluster)
    for frames, code in BAD_EVENTS:
        errors = asyncio.run(one(frames))
        assert len(errors) == 1 and errors[0].error.code == code, (frames[-1][:70], errors)
        assert errors[0].error.type == "invalid_request_error" and errors[0].error.message
    assert _keys(cluster) == before  # nothing opened a call: nothing stored


def test_what_the_session_cannot_go_on_after_gets_a_close_code(cluster, realtime_gateway):
    async def close_of(key: str, frames: list) -> tuple[int, str, list]:
        async with client(realtime_gateway, key).realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            for frame in frames:
                with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                    await conn.send_raw(frame)
            await asyncio.wait_for(caller.reader, 30)
            closed = conn._connection
            return closed.close_code, closed.close_reason, caller.of("error")

    before = _keys(cluster)
    code, reason, errors = asyncio.run(close_of("not-a-key", []))
    assert code == 1008 and "UNAUTHENTICATED" in reason and errors[0].error.code == "unauthenticated"
    code, reason, _ = asyncio.run(close_of(API_KEY, ["x" * (300 * 1024)]))  # over the 256 KiB frame limit
    assert code == 1009
    url = f"ws://127.0.0.1:{realtime_gateway.realtime.port}/v1/realtime?session_id={'0' * 32}"
    code, reason, errors = asyncio.run(_raw_close(url, [json.dumps({
        "type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0" * 960).decode()})]))
    assert code == 1008 and "NOT_FOUND" in reason and errors
    assert _keys(cluster) == before


async def _raw_close(url: str, frames: list[str]):
    async with connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
        for frame in frames:
            await ws.send(frame)
        errors = []
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            async with asyncio.timeout(30):
                async for text in ws:
                    event = json.loads(text)
                    if event["type"] == "error":
                        errors.append(event)
        return ws.close_code, ws.close_reason, errors


def test_a_client_gone_mid_answer_leaves_its_session_resumable(cluster, utterance, realtime_gateway):
    async def gone():
        async with client(realtime_gateway).realtime.connect(model="vita-audio") as conn:
            caller = Caller(conn)
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 900})
            await caller.speak(pcm24k(utterance))
            await caller.until(lambda: caller.of("response.output_audio.delta"))
            session_id = caller.of("response.created")[0].response.conversation_id
        return session_id  # the socket closed mid-answer

    session_id = asyncio.run(gone())
    url = f"ws://127.0.0.1:{realtime_gateway.realtime.port}/v1/realtime?session_id={session_id}"

    async def resumed():
        return await run_realtime_call(url, [utterance], 8000, max_new_tokens=40, api_key=API_KEY)

    deadline = time.monotonic() + 30  # the call settles its turn once it sees the socket closed
    while not (turns := history(cluster, session_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert turns[0].interrupted  # what was sent before the client went away
    result = asyncio.run(resumed())
    assert result.status == "OK" and result.turns[0].audio_s > 0, result
    assert [t.turn for t in history(cluster, session_id)] == [1, 2]


def adapter_ms_sum(direction: str) -> float:
    return metrics.GATEWAY_ADAPTER_MS.labels("realtime", direction)._sum.get()


def test_realtime_phone_client_measures_a_call(cluster, utterance, realtime_gateway):
    """The load test's client: one server-VAD turn, latency at the caller; the adapter's own time and
    its open calls are in the metrics (the gateway runs in this process)."""
    url = f"ws://127.0.0.1:{realtime_gateway.realtime.port}/v1/realtime?model=vita-audio"
    before = adapter_ms_sum("in"), adapter_ms_sum("out")
    result = asyncio.run(run_realtime_call(url, [utterance], 8000, max_new_tokens=40, api_key=API_KEY))
    assert adapter_ms_sum("in") > before[0] and adapter_ms_sum("out") > before[1]
    open_calls = metrics.GATEWAY_ADAPTER_CALLS.labels("realtime")._value.get
    deadline = time.monotonic() + 30  # the server ends each call once it sees its socket closed
    while open_calls() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_calls() == 0
    assert result.status == "OK" and len(result.turns) == 1, result
    turn = result.turns[0]
    assert turn.first_audio_ms is not None and 0 < turn.first_audio_ms < turn.chunk_arrivals[-1] * 1000 + 1
    assert turn.audio_s > 0.3 and turn.chunks == len(turn.chunk_arrivals) and not turn.error
    assert turn.audio_tokens > 0  # (text: the tiny random model may answer with audio tokens alone)
    assert result.session_id
    # push-to-talk, and a caller talking over the first answer: each turn keeps its own answer
    result = asyncio.run(run_realtime_call(url, [utterance, utterance], 8000, push_to_talk=True, max_new_tokens=40,
                                           api_key=API_KEY, barge_in=[True, False]))
    assert result.status == "OK" and len(result.turns) == 2, result
    assert all(t.first_audio_ms is not None and t.audio_s > 0 and not t.error for t in result.turns), result
    assert history(cluster, result.session_id)[-1].turn == 2


def test_wss_with_the_gateways_certificate(cluster, utterance, tmp_path):
    """With --tls-cert the endpoint is wss:// with the gateway's certificate; the SDK connects with
    its websocket options' ssl context trusting the CA, and gets its answer."""
    import argparse
    import ssl

    from tls_certs import TestCA
    from vitaserve.common.settings import REDIS_URL_ENV
    from vitaserve.gateway.auth import API_KEYS_FILE_ENV
    from vitaserve.gateway.service import Gateway
    from vitaserve.gateway.settings import GatewaySettings

    ca = TestCA(tmp_path)
    served = ca.issue("gateway")  # localhost and 127.0.0.1
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "rt", "tenant": "acme",
                                          "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]}))
    parser = argparse.ArgumentParser()
    GatewaySettings.add_arguments(parser)
    args = parser.parse_args([
        "--lm", str(cluster.ckpt / "lm"), "--encoder", f"127.0.0.1:{cluster.encoder.port}",
        "--decoder", cluster.decoder_target, "--triton", cluster.triton_grpc, "--host", "127.0.0.1", "--port", "0",
        "--replica-id", "gw-realtime-tls", "--max-utterance-s", "8", "--context-tokens", "1024",
        "--tls-cert", str(served.cert), "--tls-key", str(served.key), "--realtime-port", str(free_port())])
    gateway = cluster.run(Gateway.start(GatewaySettings.from_args(
        args, {REDIS_URL_ENV: cluster.redis_url, API_KEYS_FILE_ENV: str(keys)})))
    trust = ssl.create_default_context(cafile=str(ca.file))

    async def main():
        base = f"localhost:{gateway.realtime.port}/v1"
        sdk = AsyncOpenAI(base_url=f"https://{base}", websocket_base_url=f"wss://{base}", api_key=API_KEY)
        async with sdk.realtime.connect(model="vita-audio", websocket_connection_options={"ssl": trust}) as conn:
            caller = Caller(conn)
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 40})
            await caller.speak(pcm24k(utterance))
            await caller.until(lambda: caller.of("response.done"))
            await conn.close()
            return caller

    try:
        caller = asyncio.run(main())
        with pytest.raises(websockets.exceptions.InvalidHandshake):  # plaintext ws:// to the TLS port: no upgrade
            asyncio.run(_raw_close(f"ws://127.0.0.1:{gateway.realtime.port}/v1/realtime", []))
    finally:
        cluster.run(gateway.stop(0))
    assert caller.of("response.done")[0].response.status == "completed" and caller.audio()
