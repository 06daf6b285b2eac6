"""The Twilio Media Streams adapter on a real in-process cluster (Redis, Triton, encoder, decoders) and
a gateway serving --twilio-port with an auth token set; the test's WebSocket client acts as Twilio:
signed upgrade, `connected`, `start`, 20 ms mu-law `media` frames in real time, marks echoed.

Proves: a two-turn call gets mu-law audio back as `media` events, each followed by a `mark`; a
barge-in gets `clear` and the history keeps the answer up to the last mark echoed before it; a
session started over gRPC resumes from a Twilio stream (customParameters); every bad input gets its
close code and reason, and leaves Redis as it was."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json

import grpc
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect

from test_gateway_e2e import config, history, wait
from vitaserve.client.scripted_phone import ScriptedPhone as Phone
from vitaserve.common import metrics
from vitaserve.common.audio_facts import TOKENS_PER_SECOND
from vitaserve.devcluster.processes import free_port
from vitaserve.gateway.codecs import decode_audio, encode_audio
from vitaserve.gateway.playback import heard_ids, tokens_heard

AUTH_TOKEN = "test-twilio-auth-token"
FRAME = 160  # 20 ms of mu-law at 8 kHz


@pytest.fixture(scope="module")
def twilio_gateway(cluster):
    gateway, _ = cluster.run(cluster.start_gateway(cluster.decoder_target, "gw-twilio", "--twilio-port",
                                                   str(free_port()), environ={"VITA_TWILIO_AUTH_TOKEN": AUTH_TOKEN}))
    try:
        yield gateway
    finally:
        cluster.run(gateway.stop(0))


def url_of(gateway, path: str = "/twilio?x=1") -> str:
    return f"ws://127.0.0.1:{gateway.twilio.port}{path}"


def signed(url: str, token: str = AUTH_TOKEN) -> dict[str, str]:
    """Twilio's header: base64 HMAC-SHA1 of the URL it called, keyed with the account's auth token.
    The gateway has no --twilio-public-url here, so it signs wss:// + Host + path."""
    wss = "wss://" + url.removeprefix("ws://")
    return {"X-Twilio-Signature": base64.b64encode(hmac.new(token.encode(), wss.encode(), hashlib.sha1).digest()).decode()}


def start_event(**params: str) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZtest", "start": {
        "accountSid": "ACtest", "streamSid": "MZtest", "callSid": "CAtest", "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": params}})


class TwilioPhone:
    """Twilio's side of one stream: sends the caller's audio paced in real time, keeps every event
    the gateway sends, and echoes each `mark` at once (a phone that plays instantly) unless told not to."""

    def __init__(self, ws, echo: bool = True):
        self.ws, self.echo = ws, echo
        self.events: list[dict] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.ws:
            event = json.loads(text)
            self.events.append(event)
            self.changed.set()
            if self.echo and event["event"] == "mark":
                await self.ws.send(json.dumps({"event": "mark", "streamSid": "MZtest", "mark": event["mark"]}))

    async def open(self, **params: str) -> None:
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await self.ws.send(start_event(**params))

    async def speak(self, samples: np.ndarray, silence_s: float = 1.0) -> None:
        audio = encode_audio(np.concatenate([np.zeros(1600, np.float32), samples,
                                             np.zeros(int(silence_s * 8000), np.float32)]), "mulaw", 8000)
        for i in range(0, len(audio) - FRAME + 1, FRAME):
            await self.ws.send(json.dumps({"event": "media", "streamSid": "MZtest", "media": {
                "track": "inbound", "chunk": str(i // FRAME + 1), "timestamp": str(i // 8),
                "payload": base64.b64encode(audio[i:i + FRAME]).decode()}}))
            await asyncio.sleep(FRAME / 8000)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    async def until(self, predicate, timeout_s: float = 60) -> None:
        """Until `predicate()` holds, checked at each event from the gateway and every 50 ms."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

    async def stop(self) -> None:
        await self.ws.send(json.dumps({"event": "stop", "streamSid": "MZtest", "stop": {"callSid": "CAtest"}}))
        await asyncio.wait_for(self.reader, 60)


def completed_turns() -> float:
    return metrics.GATEWAY_TURNS.labels("completed")._value.get()


def grpc_session(cluster, utterance, turns: int) -> str:
    """A session started over gRPC with `turns` answered turns, left resumable (no HANG_UP)."""
    async def main():
        phone = Phone(cluster.gateway(0))
        task = asyncio.create_task(phone.run())
        await phone.outbox.put(config())
        for turn in range(1, turns + 1):
            await phone.speak(utterance)
            await wait(phone.event(f"turn_finished:{turn}"))
        await wait(phone.event("session_started"))
        await phone.outbox.put(None)
        assert await task == grpc.StatusCode.OK
        return phone.of("session_started")[0].session_id
    return asyncio.run(main())


def test_two_turn_call_gets_mulaw_media_and_marks(cluster, utterance, twilio_gateway):
    async def main():
        url = url_of(twilio_gateway)
        async with connect(url, additional_headers=signed(url)) as ws:
            phone = TwilioPhone(ws)
            await phone.open(mode="boost", max_new_tokens="40")
            before = completed_turns()
            for turn in (1, 2):
                await phone.speak(utterance)
                await phone.until(lambda: completed_turns() >= before + turn)
            await phone.stop()
            return phone, ws.close_code, ws.close_reason

    phone, code, reason = asyncio.run(main())
    assert code == 1000, reason
    media, marks = phone.of("media"), phone.of("mark")
    assert media and all(e["streamSid"] == "MZtest" for e in media + marks)
    # each chunk is followed by its mark, named for its turn and seq; each answer ends with vita:<turn>:end
    names = [e["mark"]["name"] if e["event"] == "mark" else "media" for e in phone.events
             if e["event"] in ("media", "mark")]
    ends = [i for i, n in enumerate(names) if n.endswith(":end")]
    assert [names[i] for i in ends] == ["vita:1:end", "vita:2:end"] and ends[-1] == len(names) - 1
    chunks = [n for n in names if not n.endswith(":end")]
    assert len(chunks) == 2 * len(media)
    assert all(chunks[i] == "media" and chunks[i + 1].startswith("vita:") for i in range(0, len(chunks), 2))
    assert {n.split(":")[1] for n in chunks if n != "media"} == {"1", "2"}
    assert all(names[i - 1] != "media" for i in ends)  # an answer's end follows its last chunk's mark
    pcm = decode_audio(b"".join(base64.b64decode(e["media"]["payload"]) for e in media), "mulaw", 8000)
    assert pcm.size > 8000 * 0.6 and np.abs(pcm).max() > 0
    assert not phone.of("clear")


def test_barge_in_sends_clear_and_history_keeps_what_was_heard(cluster, utterance, twilio_gateway):
    session_id = grpc_session(cluster, utterance, turns=0)
    is_audio = twilio_gateway.deps.vocab.is_audio

    async def main():
        url = url_of(twilio_gateway)
        async with connect(url, additional_headers=signed(url)) as ws:
            phone = TwilioPhone(ws, echo=False)  # plays nothing until told: marks come back by hand
            await phone.open(session_id=session_id, max_new_tokens="900")
            await phone.speak(utterance)
            await phone.until(lambda: len(phone.of("mark")) >= 2)
            first = phone.of("mark")[0]  # the phone played the first chunk: echo its mark
            await ws.send(json.dumps({"event": "mark", "streamSid": "MZtest", "mark": first["mark"]}))
            await phone.speak(utterance, silence_s=0.3)  # the caller talks over the answer
            await phone.until(lambda: phone.of("clear"))
            for mark in phone.of("mark")[1:]:  # Twilio echoes the marks a clear dropped: unplayed
                await ws.send(json.dumps({"event": "mark", "streamSid": "MZtest", "mark": mark["mark"]}))
            await phone.stop()
            return phone, ws.close_code

    phone, code = asyncio.run(main())
    assert code == 1000
    first_chunk = base64.b64decode(phone.of("media")[0]["media"]["payload"])
    heard_s = len(first_chunk) / 8000
    turns = history(cluster, session_id)
    assert turns[0].interrupted
    stored_audio = [i for i in turns[0].assistant_ids if is_audio(i)]
    assert len(stored_audio) == tokens_heard(heard_s) > 0
    assert turns[0].assistant_ids == heard_ids(turns[0].assistant_ids, is_audio, tokens_heard(heard_s))
    sent_s = sum(len(base64.b64decode(e["media"]["payload"])) for e in phone.of("media")) / 8000
    sent_tokens = sent_s * TOKENS_PER_SECOND
    assert len(stored_audio) < sent_tokens  # cut at the echoed mark, not at what was sent


def test_a_session_started_over_grpc_resumes_from_a_twilio_stream(cluster, utterance, twilio_gateway):
    session_id = grpc_session(cluster, utterance, turns=1)

    async def main():
        url = url_of(twilio_gateway)
        async with connect(url, additional_headers=signed(url)) as ws:
            phone = TwilioPhone(ws)
            await phone.open(session_id=session_id, max_new_tokens="40")
            before = completed_turns()
            await phone.speak(utterance)
            await phone.until(lambda: completed_turns() >= before + 1)
            await phone.stop()
            return phone, ws.close_code

    phone, code = asyncio.run(main())
    assert code == 1000 and phone.of("media")
    turns = history(cluster, session_id)
    assert [t.turn for t in turns] == [1, 2] and not any(t.interrupted for t in turns)
    assert all(t.user_audio and t.assistant_ids for t in turns)


def _keys(cluster) -> set[bytes]:
    import redis.asyncio as redis

    async def size():
        client = redis.from_url(cluster.redis_url)
        try:
            return set(await client.keys("*"))
        finally:
            await client.aclose()
    return asyncio.run(size())


BAD_INPUTS = [  # (what the platform sends after the upgrade, close code, words of the reason)
    (["{not json"], 1007, "not valid JSON"),
    ([b"\x00\x01"], 1003, "binary"),
    (['{"event": "hello"}'], 1008, "unknown event"),
    (['["start"]'], 1007, "JSON object"),
    (['{"event": "media", "media": {"payload": "AAAA"}}'], 1008, "`media` before `start`"),
    (["x" * (200 * 1024)], 1009, ""),
    ([start_event().replace("audio/x-mulaw", "audio/x-alaw")], 1003, "mediaFormat"),
    ([start_event(), '{"event": "media", "media": {"payload": "%%%"}}'], 1007, "not base64"),
    ([start_event(), '{"event": "start"}'], 1008, "after `start`"),
    ([start_event(session_id="0" * 32)], 1008, "NOT_FOUND"),
    ([start_event(api_key="not-a-key")], 1008, "UNAUTHENTICATED"),
    ([start_event(mode="warp")], 1008, "INVALID_ARGUMENT"),
    ([start_event(max_new_tokens="lots")], 1008, "max_new_tokens"),
]


def test_every_bad_input_gets_its_close_code_and_changes_nothing_stored(cluster, twilio_gateway):
    async def one(messages):
        url = url_of(twilio_gateway)
        async with connect(url, additional_headers=signed(url), max_size=None) as ws:
            for message in messages:
                await ws.send(message)
            async with asyncio.timeout(30):
                with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                    async for _ in ws:
                        pass
            return ws.close_code, ws.close_reason

    async def refused(headers) -> int:
        url = url_of(twilio_gateway)
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with connect(url, additional_headers=headers):
                pass
        return info.value.response.status_code

    before = _keys(cluster)
    for messages, code, words in BAD_INPUTS:
        got_code, reason = asyncio.run(one(messages))
        assert (got_code, words in reason) == (code, True), (messages[-1][:60], got_code, reason)
    # a refused stream leaves nothing; one refused after a good `start` leaves the session `start`
    # opened (resumable, as a Converse call after its config), with no turn: two such cases above
    new = _keys(cluster) - before
    assert len(new) == 2 and all(k.startswith(b"vita:session:{") for k in new), new
    assert all(history(cluster, k.decode().split("{")[1].rstrip("}")) == [] for k in new)
    url = url_of(twilio_gateway)
    assert asyncio.run(refused({})) == 403                                   # no signature
    assert asyncio.run(refused(signed(url, token="another account"))) == 403
    assert asyncio.run(refused(signed(url_of(twilio_gateway, "/other")))) == 403  # signed for another URL


def test_the_load_test_client_measures_first_audio_and_ends_turns_on_the_end_mark(cluster, utterance, twilio_gateway):
    """client/twilio_phone.py (loadtest --protocol twilio): two turns, each with its first audio
    measured at the caller and ended by the gateway's vita:<turn>:end mark, the stream closed 1000;
    its marks, echoed on a playback clock, reached the call (PlaybackProgress)."""
    from vitaserve.client.twilio_phone import run_twilio_call

    url = url_of(twilio_gateway, "/twilio")
    result = asyncio.run(run_twilio_call(url, [utterance, utterance], mode="boost", max_new_tokens=30,
                                         headers=signed(url), turn_timeout_s=60))
    assert result.status == "OK", result.details
    assert [t.turn for t in result.turns] == [1, 2]
    for turn in result.turns:
        assert turn.first_audio_ms is not None and 0 < turn.first_audio_ms < 60_000
        assert turn.chunks == len(turn.chunk_arrivals) > 0 and turn.audio_s > 0 and not turn.interrupted
