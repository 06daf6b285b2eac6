"""The Twilio Media Streams adapter with --twilio-preset telnyx on a real in-process cluster; the test's
WebSocket client acts as Telnyx: `connected`, `start` with top-level `stream_id` and
`start.media_format` (PCMU or PCMA), 20 ms `media` frames in real time, marks echoed, an `error` event.

Proves: a call in each codec gets its audio back in that codec as `media` + `mark` without a stream
id (Telnyx's form); Telnyx's `error` event and its outbound track do not end or feed the call; no
X-Twilio-Signature is asked although a Twilio auth token is set; a media format other than PCMU/PCMA
at 8 kHz and a bad streaming auth token are refused with their close codes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect

from vitaserve.common import metrics
from vitaserve.devcluster.processes import free_port
from vitaserve.gateway.codecs import decode_audio, encode_audio

FRAME = 160  # 20 ms of G.711 at 8 kHz
CODECS = {"PCMU": "mulaw", "PCMA": "alaw"}


@pytest.fixture(scope="module")
def telnyx_gateway(cluster):
    gateway, _ = cluster.run(cluster.start_gateway(
        cluster.decoder_target, "gw-telnyx", "--twilio-port", str(free_port()), "--twilio-preset", "telnyx",
        environ={"VITA_TWILIO_AUTH_TOKEN": "a-twilio-token-that-telnyx-calls-do-not-need"}))
    try:
        yield gateway
    finally:
        cluster.run(gateway.stop(0))


def url_of(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.twilio.port}/telnyx"


def start_event(encoding: str = "PCMU", rate=8000, **params: str) -> str:
    return json.dumps({"event": "start", "sequence_number": "1", "stream_id": "32DE0DEA-test", "start": {
        "user_id": "3e6f995f-test", "call_control_id": "v3:test", "client_state": "aGVsbG8=",
        "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1},
        "custom_parameters": params}})


class TelnyxPhone:
    """Telnyx's side of one stream: real-time caller audio in the stream's codec, every event the
    gateway sends kept, each `mark` echoed at once (playback reached it)."""

    def __init__(self, ws, codec: str):
        self.ws, self.codec = ws, codec
        self.events: list[dict] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.ws:
            event = json.loads(text)
            self.events.append(event)
            self.changed.set()
            if event["event"] == "mark":
                await self.ws.send(json.dumps({"event": "mark", "sequence_number": "9", "stream_id": "32DE0DEA-test",
                                               "mark": event["mark"]}))

    async def speak(self, samples: np.ndarray, silence_s: float = 1.0) -> None:
        audio = encode_audio(np.concatenate([np.zeros(1600, np.float32), samples,
                                             np.zeros(int(silence_s * 8000), np.float32)]), self.codec, 8000)
        for i in range(0, len(audio) - FRAME + 1, FRAME):
            payload = base64.b64encode(audio[i:i + FRAME]).decode()
            await self.ws.send(json.dumps({"event": "media", "sequence_number": str(i), "stream_id": "32DE0DEA-test",
                                           "media": {"track": "inbound", "chunk": str(i // FRAME + 1),
                                                     "timestamp": str(i // 8), "payload": payload}}))
            if i % (10 * FRAME) == 0:  # the other side of the call, as with both_tracks: not the caller
                loud = encode_audio(np.full(FRAME, 0.9, np.float32), self.codec, 8000)
                await self.ws.send(json.dumps({"event": "media", "stream_id": "32DE0DEA-test", "media": {
                    "track": "outbound", "payload": base64.b64encode(loud).decode()}}))
            await asyncio.sleep(FRAME / 8000)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    async def until(self, predicate, timeout_s: float = 90) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

    async def stop(self) -> None:
        await self.ws.send(json.dumps({"event": "stop", "stream_id": "32DE0DEA-test", "stop": {}}))
        await asyncio.wait_for(self.reader, 60)


def completed_turns() -> float:
    return metrics.GATEWAY_TURNS.labels("completed")._value.get()


@pytest.mark.parametrize("encoding", ["PCMU", "PCMA"])
def test_a_call_in_each_codec_gets_its_audio_back_in_that_codec(cluster, utterance, telnyx_gateway, encoding):
    codec = CODECS[encoding]

    async def main():
        async with connect(url_of(telnyx_gateway)) as ws:  # no X-Twilio-Signature: Telnyx sends none
            phone = TelnyxPhone(ws, codec)
            await ws.send(json.dumps({"event": "connected", "version": "1.0.0"}))
            await ws.send(start_event(encoding, max_new_tokens="40"))
            await ws.send(json.dumps({"event": "error", "stream_id": "32DE0DEA-test", "payload": {
                "code": 100002, "title": "Unknown error", "detail": "a test error, logged"}}))
            before = completed_turns()
            await phone.speak(utterance)
            await phone.until(lambda: completed_turns() >= before + 1)
            await phone.stop()
            return phone, ws.close_code, ws.close_reason

    phone, code, reason = asyncio.run(main())
    assert code == 1000, reason
    media, marks = phone.of("media"), phone.of("mark")
    ends = [m for m in marks if m["mark"]["name"].endswith(":end")]  # one per answer (twilio.Playback.turn_ended)
    assert media and len(marks) == len(media) + len(ends) and [m["mark"]["name"] for m in ends] == ["vita:1:end"]
    assert all("streamSid" not in e and "stream_id" not in e for e in media + marks)  # Telnyx's form
    data = b"".join(base64.b64decode(e["media"]["payload"]) for e in media)
    pcm = decode_audio(data, codec, 8000)
    assert pcm.size > 8000 * 0.6 and np.abs(pcm).max() > 0.01
    # in the stream's codec: re-encoding the decoded audio gives the same bytes back (G.711 decode ->
    # encode is the identity on codes, except the two codes of zero in mu-law); in the other codec
    # the same bytes decode to a signal whose re-encoding differs
    other = "alaw" if codec == "mulaw" else "mulaw"
    same = np.frombuffer(encode_audio(pcm, codec, 8000), np.uint8) == np.frombuffer(data, np.uint8)
    assert same.mean() > 0.99
    wrong = np.frombuffer(encode_audio(decode_audio(data, other, 8000), codec, 8000), np.uint8)
    assert (wrong == np.frombuffer(data, np.uint8)).mean() < 0.5


BAD_INPUTS = [  # (what Telnyx sends after the upgrade, close code, words of the reason)
    ([start_event("G722")], 1003, "media_format"),
    ([start_event("PCMU", rate=16000)], 1003, "media_format"),
    ([start_event("L16")], 1003, "PCMU or PCMA"),
    ([json.dumps({"event": "start", "start": {"media_format": {"encoding": "PCMU", "sample_rate": 8000}}})],
     1007, "stream_id"),
    ([start_event().replace('"custom_parameters": {}', '"custom_parameters": {"mode": 3}')], 1007, "custom_parameters"),
    (['{"event": "media", "media": {"payload": "AAAA"}}'], 1008, "`media` before `start`"),
]


def test_bad_format_and_bad_streaming_token_are_refused(cluster, telnyx_gateway):
    async def one(messages, headers=None):
        async with connect(url_of(telnyx_gateway), additional_headers=headers or {}) as ws:
            for message in messages:
                await ws.send(message)
            async with asyncio.timeout(30):
                with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                    async for _ in ws:
                        pass
            return ws.close_code, ws.close_reason

    for messages, code, words in BAD_INPUTS:
        got_code, reason = asyncio.run(one(messages))
        assert (got_code, words in reason) == (code, True), (messages[-1][:60], got_code, reason)
    # Telnyx's streaming auth token is taken as an API key: a wrong one is refused at `start`
    got_code, reason = asyncio.run(one([start_event()], {"x-telnyx-streaming-auth-token": "not-a-key"}))
    assert got_code == 1008 and "UNAUTHENTICATED" in reason, reason
