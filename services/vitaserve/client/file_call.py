"""One call from a WAV file to a WAV file: what `vita-audio call` and `vita-audio up --call` do.

Every check (codec and rate, the answer's folder, the question's file) is done by `prepare()`, before
anything starts or connects; `place()` makes the call, writes the answer and returns the lines to
print. Errors say which flag is wrong, in one line, as the CLI shows them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitaserve.client.phone import CallResult, TurnResult
from vitaserve.common.tls import ClientTls, TlsError
from vitaserve.gateway.auth import API_KEY_HEADER


API_KEY_ENV = "VITA_API_KEY"  # the caller's API key comes from the environment, never argv (ps shows argv)


class FileCallError(Exception):
    """A call that cannot be made or that failed; the message is one line for the user."""


class CallSetupError(FileCallError, ValueError):
    """A bad question file, answer path or audio format, found before the call."""


class CallFailed(FileCallError, RuntimeError):
    """The call or its turn failed (gRPC status or a turn Error)."""


@dataclass(frozen=True)
class FileCall:
    question: str              # --in: any WAV (rate, channels, PCM or float)
    answer: str                # --out: WAV at `rate`
    codec: str = "mulaw"       # wire codec: mulaw, alaw or pcm16
    rate: int = 8000           # wire sample rate
    mode: str = ""             # inference mode ("": the server's default)
    push_to_talk: bool = False  # END_OF_UTTERANCE instead of the server's VAD
    max_new_tokens: int = 0    # 0: the server's default
    tls_ca: str | None = None  # --tls-ca: the gateway serves TLS; trust this CA (PEM)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FileCall":
        return cls(question=args.input, answer=args.out, codec=args.codec, rate=args.rate, mode=args.mode,
                   push_to_talk=args.push_to_talk, max_new_tokens=args.max_new_tokens,
                   tls_ca=getattr(args, "tls_ca", None))  # `up --call` has no --tls-ca: its cluster is plaintext


def caller_metadata(env) -> tuple[tuple[str, str], ...]:
    """The call's credentials: $VITA_API_KEY as x-api-key, or none (a gateway allowing anonymous calls)."""
    key = env.get(API_KEY_ENV, "").strip()
    return ((API_KEY_HEADER, key),) if key else ()


@dataclass(frozen=True)
class PreparedCall:
    call: FileCall
    codec: str                 # checked against the rate
    question: np.ndarray       # mono float samples at the wire rate
    tls: ClientTls | None = None  # from --tls-ca, its file read and checked


def load_question(path: str, rate: int) -> np.ndarray:
    """The question as mono float samples at `rate` (any WAV: rate, channels, PCM or float)."""
    from vitaserve.common.resample import resample
    from vitaserve.common.wav import read_wav

    try:
        audio, file_rate = read_wav(path)
    except FileNotFoundError:
        raise CallSetupError(f"--in {path}: no such file") from None
    except OSError as exc:
        raise CallSetupError(f"--in {path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CallSetupError(f"--in {path}: {exc}") from None
    return resample(np.ascontiguousarray(audio.mean(axis=0), dtype=np.float32), file_rate, rate)


def prepare(call: FileCall) -> PreparedCall:
    """Every check the call needs, done before anything starts or connects."""
    from vitaserve.gateway.codecs import AudioFormatError, check_format

    try:
        codec = check_format(call.codec, call.rate)
    except AudioFormatError as exc:
        raise CallSetupError(str(exc)) from None
    out = Path(call.answer)
    if out.is_dir() or not out.parent.is_dir():
        raise CallSetupError(f"--out {call.answer}: not a file in an existing folder")
    tls = None
    if call.tls_ca:
        tls = ClientTls(call.tls_ca)
        try:
            tls.credentials()  # reads the CA now: a missing or non-PEM file is named before any connection
        except TlsError as exc:
            raise CallSetupError(f"--tls-ca: {exc}") from None
    return PreparedCall(call, codec, load_question(call.question, call.rate), tls)


def place(target: str, prepared: PreparedCall, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """Make the call (with `metadata`, the caller's credentials), write the answer; the transcript and
    latency lines. CallFailed if it failed."""
    import asyncio

    from vitaserve.client.phone import run_call
    from vitaserve.common.wav import write_wav
    from vitaserve.gateway.codecs import decode_audio

    call = prepared.call
    result = asyncio.run(run_call(target, [prepared.question], call.rate, prepared.codec, mode=call.mode,
                                  push_to_talk=call.push_to_talk, max_new_tokens=call.max_new_tokens,
                                  tls=prepared.tls, metadata=metadata))
    if result.status != "OK":
        hint = f" (set ${API_KEY_ENV})" if result.status == "UNAUTHENTICATED" and not metadata else ""
        raise CallFailed(f"call to {target} failed: {result.status}: {result.details}{hint}")
    turn = result.turns[0]
    if turn.error:
        raise CallFailed(f"the turn failed: {turn.error}")
    pcm = decode_audio(bytes(turn.audio), prepared.codec, call.rate) if turn.audio else np.zeros(0, np.float32)
    try:
        write_wav(call.answer, pcm, call.rate)
    except OSError as exc:
        raise CallSetupError(f"--out {call.answer}: cannot write: {exc.strerror or exc}") from None
    return summary(result, turn, call.answer)


def summary(result: CallResult, turn: TurnResult, answer: str) -> list[str]:
    lines = [f"session {result.session_id}", f"transcript: {turn.text!r}"]
    first = f"{turn.first_audio_ms:.0f} ms" if turn.first_audio_ms is not None else "no audio"
    server = turn.server_timings.get("first_audio_ms", 0.0)
    lines.append(f"first audio: {first} at the caller (server: {server:.0f} ms after end of speech); "
                 f"{turn.chunks} chunks, {turn.audio_s:.2f} s of audio -> {answer}")
    if turn.server_timings:
        lines.append(f"server: mode {turn.mode or '?'}, {turn.text_tokens} text + {turn.audio_tokens} audio tokens; "
                     + ", ".join(f"{k} {v:.0f}" for k, v in turn.server_timings.items()))
    return lines
