"""`vita-audio call`: one phone-like call through the gateway; prints transcript and latency. Over
TLS with --tls-ca; the API key from $VITA_API_KEY, not argv (any user's `ps` shows argv)."""

from __future__ import annotations


def add_call_args(p) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="gateway address")
    p.add_argument("--in", dest="input", required=True, help="the caller's question (WAV, any rate)")
    p.add_argument("--out", required=True, help="where to write the answer (WAV at --rate)")
    p.add_argument("--codec", default="mulaw", help="wire codec: mulaw, alaw or pcm16 (default mulaw)")
    p.add_argument("--rate", type=int, default=8000, help="wire sample rate (mulaw/alaw: 8000)")
    p.add_argument("--mode", default="", help="vanilla, balance, boost, turbo or 1,10,4,10 (default: server's)")
    p.add_argument("--push-to-talk", action="store_true", help="send END_OF_UTTERANCE instead of relying on VAD")
    p.add_argument("--max-new-tokens", type=int, default=0, help="cap of the answer's tokens (0: server default)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="the gateway serves TLS: trust this CA (PEM). The API key, if the gateway needs one, "
                        "comes from $VITA_API_KEY (sent as x-api-key), never from the command line")


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "call", help="make one phone-like call through a running gateway",
        description="Play a WAV file into a Converse call in real time (20 ms frames in the chosen codec), "
                    "then silence so the server's VAD ends the utterance, receive the answer, hang up. "
                    "Writes the answer as WAV and prints the transcript and the first-audio latency measured "
                    "at the caller (last frame of the question -> first audio chunk).")
    add_call_args(p)
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    import os

    from vitaserve.cli.main import CLIError
    from vitaserve.client.file_call import FileCall, FileCallError, caller_metadata, place, prepare

    try:
        lines = place(args.target, prepare(FileCall.from_args(args)), caller_metadata(os.environ))
    except FileCallError as exc:
        raise CLIError(str(exc)) from None
    print("\n".join(lines))
    return 0
