"""Twilio's side of a Media Streams call, as a client: what the load test drives the adapter with.

It plays Twilio's part the way a phone line does: the caller's mu-law 8 kHz audio goes out in real-time
20 ms `media` events, and the answer's `media` is "played" on a clock (each chunk starts when the one
before it has finished), so each `mark` is echoed when playback reaches it and a `clear` echoes the
marks it dropped at once; that is what Twilio does, and what the gateway's history cut reads.

Latency is measured as client/phone.py does, at the caller: from the last frame of the utterance to
the first `media` of the answer. Media Streams has no end-of-answer event; the gateway marks the end
of each turn with a mark named `vita:<turn>:end` (gateway/adapters/twilio.py), which ends the turn here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import uuid

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from vitaserve.client.phone import FRAME_S, CallResult, TurnResult
from vitaserve.gateway.codecs import encode_audio

RATE = 8000
FRAME = int(RATE * FRAME_S)  # 160 mu-law bytes per 20 ms
END_MARK = ":end"  # suffix of the mark the gateway sends when a turn's answer ended


def start_event(stream_sid: str, params: dict[str, str]) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": stream_sid, "start": {
        "accountSid": "ACloadtest", "streamSid": stream_sid, "callSid": "CA" + stream_sid[2:],
        "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
        "customParameters": params}})


class _Player:
    """The line's playback clock: marks are echoed when the audio before them has played."""

    def __init__(self, ws, stream_sid: str):
        self.ws, self.sid = ws, stream_sid
        self.free_at = 0.0  # loop time when the audio queued so far has played
        self.timers: list[tuple[asyncio.TimerHandle, str]] = []  # marks not echoed yet

    def play(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.free_at = max(self.free_at, loop.time()) + seconds

    def mark(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.timers = [(t, n) for t, n in self.timers if t.when() > now]  # echoed already
        self.timers.append((loop.call_at(max(self.free_at, now), self._echo, name), name))

    def clear(self) -> None:
        """`clear`: playback stops now; every pending mark comes back at once, as Twilio echoes them."""
        now = asyncio.get_running_loop().time()
        pending = [(t, n) for t, n in self.timers if not t.cancelled() and t.when() > now]
        self.close()
        self.timers, self.free_at = [], 0.0
        for _, name in pending:
            self._echo(name)

    def _echo(self, name: str) -> None:
        asyncio.ensure_future(self._send(name))

    async def _send(self, name: str) -> None:
        try:
            await self.ws.send(json.dumps({"event": "mark", "streamSid": self.sid, "mark": {"name": name}}))
        except ConnectionClosed:
            pass

    def close(self) -> None:
        for timer, _ in self.timers:
            timer.cancel()


async def run_twilio_call(url: str, utterances: list[np.ndarray], mode: str = "", max_new_tokens: int = 0,
                          silence_s: float = 1.0, turn_timeout_s: float = 120.0, barge_in: list[bool] | None = None,
                          params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                          ssl_context: ssl.SSLContext | None = None) -> CallResult:
    """One Media Streams call to `url` (ws:// or wss://), one turn per utterance (float samples at
    8 kHz). barge_in[i]: the caller starts utterance i+1 as soon as answer i's first audio arrives.
    params: extra customParameters (e.g. api_key); headers: the upgrade's headers."""
    result = CallResult()
    barge_in = barge_in or [False] * len(utterances)
    sid = "MZ" + uuid.uuid4().hex
    custom = dict(params or {})
    if mode:
        custom["mode"] = mode
    if max_new_tokens:
        custom["max_new_tokens"] = str(max_new_tokens)
    state: dict = {"turn": None, "t_end": None, "number": 0}
    first_audio, turn_done = asyncio.Event(), asyncio.Event()

    def since_end() -> float:
        return (time.perf_counter() - state["t_end"]) * 1000 if state["t_end"] else 0.0

    async def send_paced(ws, samples: np.ndarray, chunk0: int) -> int:
        loop = asyncio.get_running_loop()
        audio = encode_audio(samples, "mulaw", RATE)
        start = loop.time()
        for i, offset in enumerate(range(0, len(audio), FRAME)):
            await ws.send(json.dumps({"event": "media", "streamSid": sid, "media": {
                "track": "inbound", "chunk": str(chunk0 + i + 1), "timestamp": str((chunk0 + i) * 20),
                "payload": base64.b64encode(audio[offset:offset + FRAME]).decode()}}))
            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_S - loop.time()))
        return chunk0 + len(range(0, len(audio), FRAME))

    async def receive(ws, player: _Player) -> None:
        async for text in ws:
            event = json.loads(text)
            kind, turn = event.get("event"), state["turn"]
            if kind == "media" and turn is not None:
                pcm_s = len(base64.b64decode(event["media"]["payload"])) / RATE
                player.play(pcm_s)
                if turn.first_audio_ms is None:
                    turn.first_audio_ms = since_end()
                    first_audio.set()
                turn.audio_s += pcm_s
                turn.chunks += 1
                turn.chunk_arrivals.append(since_end() / 1000)
                turn.chunk_durations.append(pcm_s)
            elif kind == "mark":
                name = event["mark"]["name"]
                if name.endswith(END_MARK):
                    if turn is not None and name == f"vita:{state['number']}{END_MARK}":
                        turn_done.set()
                else:
                    player.mark(name)
            elif kind == "clear":
                if turn is not None:
                    turn.interrupted = True
                player.clear()

    try:
        async with connect(url, additional_headers=headers, ssl=ssl_context, open_timeout=turn_timeout_s) as ws:
            player = _Player(ws, sid)
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(start_event(sid, custom))
            receiver = asyncio.create_task(receive(ws, player))
            chunk = 0
            try:
                for n, utterance in enumerate(utterances, start=1):
                    turn_done.clear()
                    first_audio.clear()
                    state["turn"], state["number"] = TurnResult(turn=n, started_at=time.monotonic()), n
                    chunk = await send_paced(ws, utterance, chunk)
                    state["t_end"] = time.perf_counter()
                    silence = asyncio.create_task(send_paced(ws, np.zeros(int(silence_s * RATE), np.float32), chunk))
                    interrupt = barge_in[n - 1] and n < len(utterances)
                    waiter = asyncio.create_task((first_audio if interrupt else turn_done).wait())
                    done, _ = await asyncio.wait({waiter, receiver}, timeout=turn_timeout_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    silence.cancel()
                    waiter.cancel()
                    chunk += int(silence_s / FRAME_S)
                    state["turn"].ended_at = time.monotonic()
                    result.turns.append(state["turn"])
                    if receiver in done:
                        break
                    if not done:
                        result.status, result.details = "DEADLINE_EXCEEDED", f"no answer within {turn_timeout_s:.0f} s"
                        break
                    if not interrupt:  # the caller listens to the end before speaking again (the line still plays)
                        await asyncio.sleep(max(0.0, player.free_at - asyncio.get_running_loop().time()))
                await ws.send(json.dumps({"event": "stop", "streamSid": sid, "stop": {"callSid": "CA" + sid[2:]}}))
                await asyncio.wait_for(receiver, turn_timeout_s)
            finally:
                player.close()
                receiver.cancel()
            code, reason = ws.close_code, ws.close_reason or ""
    except ConnectionClosed as exc:
        code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "the connection dropped")
    except (OSError, asyncio.TimeoutError) as exc:
        result.status, result.details = "UNAVAILABLE", f"cannot reach {url}: {exc}"
        return result
    if result.status == "OK" and code not in (1000, None):
        result.status, result.details = f"WS_CLOSE_{code}", reason
    return result
