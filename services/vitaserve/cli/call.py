"""`vita-audio call`: one phone-like call through the gateway; prints transcript and latency."""

from __future__ import annotations


def add_call_args(p, with_target: bool = True) -> None:
    if with_target:
        p.add_argument("--target", default="127.0.0.1:50051", help="gateway address")
    p.add_argument("--in", dest="input", required=True, help="the caller's question (WAV, any rate)")
    p.add_argument("--out", required=True, help="where to write the answer (WAV at --rate)")
    p.add_argument("--codec", default="mulaw", help="wire codec: mulaw, alaw or pcm16 (default mulaw)")
    p.add_argument("--rate", type=int, default=8000, help="wire sample rate (mulaw/alaw: 8000)")
    p.add_argument("--mode", default="", help="vanilla, balance, boost, turbo or 1,10,4,10 (default: server's)")
    p.add_argument("--push-to-talk", action="store_true", help="send END_OF_UTTERANCE instead of relying on VAD")
    p.add_argument("--max-new-tokens", type=int, default=0, help="cap of the answer's tokens (0: server default)")


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "call", help="make one phone-like call through a running gateway",
        description="Play a WAV file into a Converse call in real time (20 ms frames in the chosen codec), "
                    "then silence so the server's VAD ends the utterance, receive the answer, hang up. "
                    "Writes the answer as WAV and prints the transcript and the first-audio latency measured "
                    "at the caller (last frame of the question -> first audio chunk).")
    add_call_args(p)
    p.set_defaults(func=cmd)


def load_question(path: str, rate: int):
    """The question as mono float samples at `rate` (any WAV: rate, channels, PCM or float)."""
    import numpy as np

    from vitaserve.cli.main import CLIError
    from vitaserve.common.resample import resample
    from vitaserve.common.wav import read_wav

    try:
        audio, file_rate = read_wav(path)
    except FileNotFoundError:
        raise CLIError(f"--in {path}: no such file") from None
    except OSError as exc:
        raise CLIError(f"--in {path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CLIError(f"--in {path}: {exc}") from None
    return resample(np.ascontiguousarray(audio.mean(axis=0), dtype=np.float32), file_rate, rate)


def prepare_call(args):
    """(codec, question samples): every check a call needs, done before anything starts or connects."""
    from pathlib import Path

    from vitaserve.cli.main import CLIError
    from vitaserve.gateway.codecs import AudioFormatError, check_format

    try:
        codec = check_format(args.codec, args.rate)
    except AudioFormatError as exc:
        raise CLIError(str(exc)) from None
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise CLIError(f"--out {args.out}: not a file in an existing folder")
    return codec, load_question(args.input, args.rate)


def place_call(args, target: str, prepared=None) -> int:
    """Make the call, write --out, print transcript and latency; CLIError if the call or turn fails."""
    import asyncio

    import numpy as np

    from vitaserve.cli.main import CLIError
    from vitaserve.common.wav import write_wav
    from vitaserve.gateway.codecs import decode_audio
    from vitaserve.gateway.phone import run_call

    codec, question = prepared or prepare_call(args)
    result = asyncio.run(run_call(target, [question], args.rate, codec, mode=args.mode,
                                  push_to_talk=args.push_to_talk, max_new_tokens=args.max_new_tokens))
    if result.status != "OK":
        raise CLIError(f"call to {target} failed: {result.status}: {result.details}")
    turn = result.turns[0]
    if turn.error:
        raise CLIError(f"the turn failed: {turn.error}")
    pcm = decode_audio(bytes(turn.audio), codec, args.rate) if turn.audio else np.zeros(0, np.float32)
    try:
        write_wav(args.out, pcm, args.rate)
    except OSError as exc:
        raise CLIError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from None
    print(f"session {result.session_id}")
    print(f"transcript: {turn.text!r}")
    first = f"{turn.first_audio_ms:.0f} ms" if turn.first_audio_ms is not None else "no audio"
    server = turn.server_timings.get("first_audio_ms", 0.0)
    print(f"first audio: {first} at the caller (server: {server:.0f} ms after end of speech); "
          f"{turn.chunks} chunks, {turn.audio_s:.2f} s of audio -> {args.out}")
    if turn.server_timings:
        print(f"server: mode {turn.mode or '?'}, {turn.text_tokens} text + {turn.audio_tokens} audio tokens; "
              + ", ".join(f"{k} {v:.0f}" for k, v in turn.server_timings.items()))
    return 0


def cmd(args) -> int:
    return place_call(args, args.target)
