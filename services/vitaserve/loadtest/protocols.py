"""How the load test places one call over each protocol the gateway speaks.

gRPC Converse is the API itself; the others are the gateway's telephony adapters (gateway/adapters/),
each on its own port: Twilio Media Streams and OpenAI Realtime over WebSocket, Asterisk AudioSocket
over TCP. Every client measures the same thing at the caller (client/phone.py's definition: from the
last frame of the utterance to the first audio of the answer) and returns the same CallResult, so
the report treats every protocol alike. `target` is what the protocol connects to: host:port for
gRPC and AudioSocket, a ws:// or wss:// URL for the WebSocket protocols.
"""

from __future__ import annotations

import numpy as np

from vitaserve.client.phone import CallResult, run_call

PROTOCOLS = ("grpc", "twilio", "realtime", "audiosocket")
# AudioSocket has no end-of-answer signal: its caller takes this long without answer audio as the end.
# Under load a starved answer pauses mid-way (gaps between chunks up to 1.7 s at 4 calls on the 2-core
# test machine, every protocol); a caller that spoke into such a pause would barge in and spoil the
# next turn's figure, so this is three times that.
AUDIOSOCKET_ANSWER_GAP_S = 5.0
# the audio each protocol carries: what the caller's utterances must be resampled to
PROTOCOL_AUDIO = {"twilio": ("mulaw", 8000), "realtime": ("pcm16", 24000), "audiosocket": ("pcm16", 8000)}


def audio_of(protocol: str, codec: str, rate: int) -> tuple[str, int]:
    """(codec, rate) the calls of `protocol` send: the adapters' fixed formats, gRPC's chosen one."""
    return PROTOCOL_AUDIO.get(protocol, (codec, rate))


async def place_call(cfg, utterances: list[np.ndarray], mode: str, barge_in: list[bool]) -> CallResult:
    """One call of `cfg.protocol` to `cfg.target` (a load-test LoadConfig), one turn per utterance."""
    if cfg.protocol == "grpc":
        return await run_call(cfg.target, utterances, cfg.rate, cfg.codec, mode=mode, push_to_talk=cfg.push_to_talk,
                              max_new_tokens=cfg.max_new_tokens, greedy=True, turn_timeout_s=cfg.turn_timeout_s,
                              barge_in=barge_in, tls=cfg.caller_tls())
    if cfg.protocol == "twilio":
        from vitaserve.client.twilio_phone import run_twilio_call

        return await run_twilio_call(cfg.target, utterances, mode=mode, max_new_tokens=cfg.max_new_tokens,
                                     turn_timeout_s=cfg.turn_timeout_s, barge_in=barge_in)
    if cfg.protocol == "realtime":
        from vitaserve.client.realtime_phone import run_realtime_call

        return await run_realtime_call(cfg.target, utterances, 24000, mode=mode, push_to_talk=cfg.push_to_talk,
                                       max_new_tokens=cfg.max_new_tokens, turn_timeout_s=cfg.turn_timeout_s,
                                       barge_in=barge_in)
    if cfg.protocol == "audiosocket":
        from vitaserve.client.audiosocket_phone import run_audiosocket_call

        host, _, port = cfg.target.rpartition(":")
        return await run_audiosocket_call(host, int(port), utterances, 8000, mode=mode, push_to_talk=cfg.push_to_talk,
                                          max_new_tokens=cfg.max_new_tokens, turn_timeout_s=cfg.turn_timeout_s,
                                          barge_in=barge_in, answer_gap_s=AUDIOSOCKET_ANSWER_GAP_S)
    raise ValueError(f"unknown protocol {cfg.protocol!r}: one of {', '.join(PROTOCOLS)}")
