"""A phone-like client of the gateway's OpenAI Realtime endpoint (--realtime-port), for the load test.

The same call as client/phone.py's run_call, over the Realtime protocol (GA schema) with the
`websockets` library directly (lighter than the openai SDK under load): one utterance per turn in
real-time 20 ms `input_audio_buffer.append`s of 24 kHz PCM, then silence (server VAD) or commit +
response.create (push-to-talk); latency measured at the caller, from the last frame of the utterance
to the first `response.output_audio.delta`. The same CallResult / TurnResult as phone.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from vitaserve.client.phone import FRAME_S, CallResult, TurnResult
from vitaserve.common.resample import resample
from vitaserve.gateway.codecs import encode_audio

RATE = 24000  # audio/pcm of the Realtime protocol


async def run_realtime_call(url: str, utterances: list[np.ndarray], rate: int, mode: str = "",
                            push_to_talk: bool = False, max_new_tokens: int = 0, turn_timeout_s: float = 120.0,
                            barge_in: list[bool] | None = None, api_key: str | None = None,
                            ssl_context: ssl.SSLContext | None = None, silence_s: float = 1.0) -> CallResult:
    """One call with one turn per utterance (float samples at `rate`) to `url` (ws[s]://host:port,
    any path). barge_in[i]: the caller starts the next utterance as soon as the first audio of answer
    i arrives (talking over it; with push_to_talk it first sends response.cancel, as there is no server
    VAD to stop the answer). api_key: sent as `Authorization: Bearer <key>`, as the SDK does."""
    frame = int(RATE * FRAME_S)
    result = CallResult()
    barge_in = barge_in or [False] * len(utterances)
    turn_done, first_audio = asyncio.Event(), asyncio.Event()
    state: dict = {"turn": None, "t_end": None, "active": None}  # active: the response id being generated
    separator = "&" if "?" in url else "?"
    if mode:
        url += f"{separator}mode={mode}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def since_end() -> float:
        return (time.perf_counter() - state["t_end"]) * 1000 if state["t_end"] else 0.0

    async with connect(url, additional_headers=headers, ssl=ssl_context, max_size=None) as ws:
        async def send(event: dict) -> None:
            await ws.send(json.dumps(event))

        async def send_paced(samples: np.ndarray) -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i, offset in enumerate(range(0, len(samples), frame)):
                pcm = encode_audio(samples[offset:offset + frame], "pcm16", RATE)
                await send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
                await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_S - loop.time()))

        by_response: dict[str, TurnResult] = {}  # a barged-in answer's late events stay with its own turn

        async def receive() -> None:
            async for text in ws:
                event = json.loads(text)
                kind = event["type"]
                if kind == "response.created":
                    result.session_id = result.session_id or event["response"].get("conversation_id", "")
                    state["active"] = event["response"]["id"]
                    if state["turn"] is not None and state["turn"] not in by_response.values():
                        by_response[event["response"]["id"]] = state["turn"]
                response_id = event.get("response_id") or (event.get("response") or {}).get("id")
                turn = by_response.get(response_id) if response_id else state["turn"]
                if turn is None:
                    continue
                if kind == "response.output_audio.delta":
                    data = base64.b64decode(event["delta"])
                    if turn.first_audio_ms is None:
                        turn.first_audio_ms = since_end()
                        if turn is state["turn"]:
                            first_audio.set()
                    turn.audio += data
                    duration = len(data) / (2 * RATE)
                    turn.audio_s += duration
                    turn.chunks += 1
                    turn.chunk_arrivals.append(since_end() / 1000)
                    turn.chunk_durations.append(duration)
                elif kind == "response.output_audio_transcript.delta":
                    if turn.first_text_ms is None:
                        turn.first_text_ms = since_end()
                    turn.text += event["delta"]
                elif kind == "response.done":
                    response = event["response"]
                    if state["active"] == response["id"]:
                        state["active"] = None
                    usage = (response.get("usage") or {}).get("output_token_details") or {}
                    turn.text_tokens, turn.audio_tokens = usage.get("text_tokens", 0), usage.get("audio_tokens", 0)
                    turn.interrupted = response["status"] == "cancelled"
                    turn.mode = mode
                    if response["status"] == "failed":
                        turn.error = json.dumps(response.get("status_details"))
                    if turn is state["turn"]:
                        turn_done.set()
                elif kind == "error" and event["error"].get("code") != "response_cancel_not_active":
                    turn.error = f'{event["error"].get("code")}: {event["error"].get("message")}'

        async def speak() -> None:
            session: dict = {"type": "realtime", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": RATE},
                "turn_detection": None if push_to_talk else {"type": "server_vad"}},
                "output": {"format": {"type": "audio/pcm", "rate": RATE}}}}
            if max_new_tokens:
                session["max_output_tokens"] = max_new_tokens
            await send({"type": "session.update", "session": session})
            for n, utterance in enumerate(utterances, start=1):
                turn_done.clear()
                first_audio.clear()
                state["turn"] = TurnResult(turn=n, started_at=time.monotonic())
                if push_to_talk and state["active"] is not None:  # talking over the answer: stop it, as a
                    await send({"type": "response.cancel"})    # push-to-talk client does (no server VAD)
                await send_paced(resample(utterance.astype(np.float32), rate, RATE))
                state["t_end"] = time.perf_counter()
                if push_to_talk:
                    await send({"type": "input_audio_buffer.commit"})
                    await send({"type": "response.create"})
                silence = asyncio.create_task(send_paced(np.zeros(int(silence_s * RATE), np.float32)))
                interrupt = barge_in[n - 1] and n < len(utterances)
                try:
                    await asyncio.wait_for((first_audio if interrupt else turn_done).wait(), turn_timeout_s)
                finally:
                    silence.cancel()
                    await asyncio.gather(silence, return_exceptions=True)
                state["turn"].ended_at = time.monotonic()
                result.turns.append(state["turn"])
            await ws.close()

        receiver = asyncio.create_task(receive())
        speaker = asyncio.create_task(speak())
        try:
            await speaker
        except asyncio.TimeoutError:
            result.status, result.details = "DEADLINE_EXCEEDED", f"no answer within {turn_timeout_s:.0f} s"
        except ConnectionClosed:
            pass
        finally:
            await ws.close()
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        if ws.close_code not in (None, 1000) and result.status == "OK":
            result.status, result.details = f"CLOSED_{ws.close_code}", ws.close_reason or ""
    return result
