"""Everything the gateway needs, in one frozen object built once at start-up and passed down.

Plain values come from flags (`add_arguments`, read back by `from_args`); the Redis URL carries the
password, so it never does: it is read from $VITA_REDIS_URL or the file named by $VITA_REDIS_URL_FILE
(vitaserve.common.settings), and it is left out of the repr so logging the settings cannot leak it.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from vitaserve.common.settings import (REDIS_URL_ENV, SettingsError, add_internal_tls_arguments,
                                       add_redis_tls_arguments, add_server_arguments, add_tls_arguments,
                                       internal_tls, redis_tls, redis_url, secret, server_tls)
from vitaserve.common import keys
from vitaserve.common.tls import ClientTls, ServerTls
from vitaserve.gateway.auth import API_KEYS_FILE_ENV
from vitaserve.gateway.chunker import PRESETS, ChunkPlan, ChunkPlanError

DEFAULT_PORT = 50051
TWILIO_AUTH_TOKEN_ENV = "VITA_TWILIO_AUTH_TOKEN"  # or $VITA_TWILIO_AUTH_TOKEN_FILE: X-Twilio-Signature's key
AUDIOSOCKET_API_KEY_ENV = "VITA_AUDIOSOCKET_API_KEY"  # or ..._FILE: the API key every AudioSocket call presents
TWILIO_PRESETS = ("twilio", "telnyx")  # the dialect of Media Streams --twilio-port speaks
# (setting, lowest, highest) of the call limits, in seconds: tests use fractions of a second, a week
# is longer than any call a telephony platform holds.
LIMIT_RANGES_S = (("first_message_s", 0.1, 3600.0), ("idle_s", 0.1, 7 * 86400.0),
                  ("max_call_s", 1.0, 7 * 86400.0), ("max_reader_stall_s", 0.1, 3600.0))


@dataclass(frozen=True)
class GatewaySettings:
    lm_dir: str                           # VITA-Audio folder: its text tokenizer and config.json are read
    encoder: str                          # gRPC targets: host:port, dns:///name:port, ipv4:a,b (round-robin)
    decoder: str
    triton: str                           # Triton's gRPC address (the generator)
    redis_url: str = field(repr=False)    # a secret: from the environment, never argv
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT              # 0 = any free port
    metrics_port: int = 0                 # Prometheus /metrics (0 = off)
    grace_s: float = 30.0                 # on SIGTERM: running calls get this long to finish
    replica_id: str = "gateway"           # names this replica in session ownership
    default_mode: str = "boost"
    max_new_tokens: int = 1024            # answers of calls that ask for 0 (lowered to what fits the context)
    context_tokens: int = 4096            # the generator's context (Triton's max_len): prompt + answer
    chunk_plan: ChunkPlan = PRESETS["vita"]  # decoder block sizes (gateway.chunker)
    max_utterance_s: float = 30.0         # longer turns: VAD cuts them; push-to-talk gets OUT_OF_RANGE
    realtime_slack_s: float = 2.0         # caller audio may run this far ahead of the wall clock
    token_gap_s: float = 5.0              # the generator stream's deadline between two tokens (a hung Triton)
    max_frame_bytes: int = 64 * 1024      # one AudioFrame
    # -- admission and limits (ARCHITECTURE.md "Limits and admission")
    max_calls: int = 100                  # Converse + Synthesize + Transcribe at once; more: RESOURCE_EXHAUSTED
    first_message_s: float = 10.0         # no CallConfig this long after a Converse opens: DEADLINE_EXCEEDED
    idle_s: float = 120.0                 # no caller message this long while no answer plays: the call ends
    max_call_s: float = 7200.0            # a Converse call ends after this long (the session stays resumable)
    max_reader_stall_s: float = 30.0      # a caller that reads nothing this long while we have audio: call ends
    # -- TLS (common/tls.py): None is plaintext; the CLI asks for --plaintext explicitly
    tls: ServerTls | None = None          # the public port
    health_port: int = 0                  # plaintext grpc.health.v1 alone, for probes without TLS (0: off)
    internal_tls: ClientTls | None = None  # to encoder, decoder and Triton (one client identity)
    redis_tls: ClientTls | None = None    # to a rediss:// Redis
    # -- callers (gateway/auth.py): at least one source, or allow_anonymous, or the gateway does not start
    api_keys_file: str | None = None      # from $VITA_API_KEYS_FILE (a mounted Secret); reloaded on change
    jwks_file: str | None = None          # public keys for JWTs, chosen by kid; reloaded on change
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_tenant_claim: str = "tenant"
    jwt_leeway_s: float = 30.0            # clock skew allowed on exp/nbf/iat
    allow_anonymous: bool = False         # local development: calls without credentials are tenant "anonymous"
    # -- per-tenant quotas (gateway/quota.py), shared through Redis; 0 = unlimited
    tenant_max_calls: int = 0
    tenant_calls_per_minute: int = 0
    tenant_limits_file: str | None = None  # per-tenant overrides {"tenants": {...}}; reloaded on change
    quota_lease_s: float = 30.0           # a killed gateway's calls stop counting this long after it died
    # -- retention of stored history
    history_ttl_s: int = keys.SESSION_TTL_S  # an idle session and its history are deleted this long after use
    store_text: bool = True               # False: turns are stored without their transcript text
    # -- protocol adapters (gateway/adapters/): each on its own port of this process, 0 = off
    twilio_port: int = 0                  # Twilio Media Streams WebSocket (bidirectional <Connect><Stream>)
    twilio_public_url: str = ""           # wss://host[:port] Twilio calls (signed URL); "": wss:// + the Host header
    twilio_auth_token: str | None = field(default=None, repr=False)  # a secret: X-Twilio-Signature checked when set
    realtime_port: int = 0                # OpenAI Realtime WebSocket (server side; GA schema, beta on request)
    twilio_preset: str = "twilio"         # "telnyx": Telnyx's variant of the events (PCMU and PCMA)
    audiosocket_port: int = 0             # Asterisk AudioSocket TCP (plaintext: internal to the PBX's network)
    audiosocket_api_key: str | None = field(default=None, repr=False)  # a secret: the credential of its calls

    def __post_init__(self) -> None:
        for name in ("lm_dir", "encoder", "decoder", "triton", "redis_url", "host", "replica_id", "default_mode"):
            if not getattr(self, name):
                raise SettingsError(f"{_where(name)} is empty")
        for name, lo, hi in (("port", 0, 65535), ("metrics_port", 0, 65535), ("health_port", 0, 65535),
                             ("twilio_port", 0, 65535), ("audiosocket_port", 0, 65535), ("realtime_port", 0, 65535),
                             ("max_new_tokens", 1, None),
                             ("context_tokens", 1, None), ("max_frame_bytes", 1, None), ("max_calls", 1, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                raise SettingsError(f"{_where(name)} must be a whole number in "
                                    f"[{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
        if not 0.5 <= self.max_utterance_s <= 600:  # the VAD's own range (gateway.vad.VadConfig)
            raise SettingsError(f"{_where('max_utterance_s')} must be in [0.5, 600], got {self.max_utterance_s}")
        for name in ("grace_s", "realtime_slack_s"):
            if not getattr(self, name) >= 0:
                raise SettingsError(f"{_where(name)} must be >= 0, got {getattr(self, name)}")
        if not 0.1 <= self.token_gap_s <= 600:
            raise SettingsError(f"{_where('token_gap_s')} must be in [0.1, 600], got {self.token_gap_s}")
        for name, lo, hi in LIMIT_RANGES_S:
            if not lo <= getattr(self, name) <= hi:  # also refuses NaN
                raise SettingsError(f"{_where(name)} must be in [{lo:g}, {hi:g}] seconds, got {getattr(self, name)}")
        for name, lo, hi in (("tenant_max_calls", 0, None), ("tenant_calls_per_minute", 0, None),
                             ("history_ttl_s", 1, 30 * 86400)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                raise SettingsError(f"{_where(name)} must be a whole number in "
                                    f"[{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
        if not 0 <= self.jwt_leeway_s <= 300:
            raise SettingsError(f"--jwt-leeway-s must be in [0, 300] seconds, got {self.jwt_leeway_s}")
        if not 0.1 <= self.quota_lease_s <= 3600:
            raise SettingsError(f"--quota-lease-s must be in [0.1, 3600] seconds, got {self.quota_lease_s}")
        if self.jwks_file and not (self.jwt_issuer and self.jwt_audience):
            raise SettingsError("--jwks-file needs --jwt-issuer and --jwt-audience: tokens of another issuer or "
                                "for another service must not be accepted")
        if not self.jwt_tenant_claim:
            raise SettingsError("--jwt-tenant-claim is empty")
        if self.twilio_public_url and not self.twilio_public_url.startswith(("wss://", "ws://")):
            raise SettingsError(f"--twilio-public-url must start with wss:// or ws://, got {self.twilio_public_url!r}")
        if self.twilio_preset not in TWILIO_PRESETS:
            raise SettingsError(f"--twilio-preset must be one of {', '.join(TWILIO_PRESETS)}, "
                                f"got {self.twilio_preset!r}")
        if not isinstance(self.chunk_plan, ChunkPlan):
            raise SettingsError(f"{_where('chunk_plan')} must be a ChunkPlan, got {self.chunk_plan!r}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The gateway's flags: every plain setting (the Redis URL is not one: see the secrets section)."""
        d, p = cls, parser.add_argument
        p("--lm", dest="lm_dir", required=True, metavar="DIR",
          help="VITA-Audio folder (its text tokenizer and config.json are read)")
        p("--encoder", required=True, help="encoder address (host:port, dns:///name:port, ipv4:a,b)")
        p("--decoder", required=True, help="decoder address (several replicas: dns:/// or ipv4:a,b)")
        p("--triton", required=True, help="Triton gRPC address (host:port)")
        p("--host", default=d.host, help=f"address to listen on (default {d.host})")
        add_server_arguments(parser, d.port, d.grace_s)  # --port, --metrics-port, --grace-s
        p("--replica-id", default=None,
          help="this replica's name in session ownership (default: the host name, a pod's name)")
        p("--mode", dest="default_mode", metavar="MODE", default=d.default_mode,
          help=f"inference mode of calls that name none (default {d.default_mode})")
        p("--max-new-tokens", type=int, default=d.max_new_tokens,
          help=f"answer length of calls that ask for 0, lowered to what fits the context (default {d.max_new_tokens})")
        p("--context-tokens", type=int, default=d.context_tokens,
          help="the generator's context in tokens (Triton's max_len): prompts keep the newest turns that fit "
               f"beside the answer's max_new_tokens (default {d.context_tokens})")
        p("--chunk-plan", default="vita",
          help=f"decoder block sizes in audio tokens: a preset ({', '.join(PRESETS)}) or sizes like 10,25,50 "
               "(the last repeats; default vita)")
        p("--max-utterance-s", type=float, default=d.max_utterance_s,
          help=f"longest turn: VAD cuts it there, push-to-talk gets OUT_OF_RANGE (default {d.max_utterance_s:g})")
        p("--token-gap-s", type=float, default=d.token_gap_s,
          help="deadline between two tokens of the generator stream (prefill included): a hung Triton fails "
               f"the turn with DEADLINE_EXCEEDED after this long (default {d.token_gap_s:g})")
        p("--realtime-slack-s", type=float, default=d.realtime_slack_s,
          help=f"how far caller audio may run ahead of real time (default {d.realtime_slack_s:g})")
        p("--max-frame-bytes", type=int, default=d.max_frame_bytes,
          help=f"largest AudioFrame in bytes (default {d.max_frame_bytes})")
        p("--max-calls", type=int, default=d.max_calls,
          help="calls this replica serves at once (Converse, Synthesize and Transcribe together); one more is "
               f"refused at once with RESOURCE_EXHAUSTED, to be retried on another replica (default {d.max_calls})")
        p("--first-message-s", type=float, default=d.first_message_s,
          help="a Converse call that sends no CallConfig this long after it opens ends with DEADLINE_EXCEEDED "
               f"(default {d.first_message_s:g})")
        p("--idle-s", type=float, default=d.idle_s,
          help="a call whose caller sends nothing this long while no answer is playing ends with "
               f"DEADLINE_EXCEEDED (default {d.idle_s:g})")
        p("--max-call-s", type=float, default=d.max_call_s,
          help="longest Converse call: it then ends with DEADLINE_EXCEEDED and the caller may resume the "
               f"session on a new call (default {d.max_call_s:g})")
        p("--max-reader-stall-s", type=float, default=d.max_reader_stall_s,
          help="a caller that takes none of the messages waiting for it this long ends its call with "
               f"DEADLINE_EXCEEDED (default {d.max_reader_stall_s:g})")
        add_tls_arguments(parser)  # --tls-cert, --tls-key, --tls-client-ca, --plaintext, --health-port
        add_internal_tls_arguments(parser)  # --internal-ca, --internal-cert, --internal-key
        add_redis_tls_arguments(parser)  # --redis-ca, --redis-cert, --redis-key
        _add_caller_arguments(parser)
        _add_adapter_arguments(parser)
        parser.add_argument_group(
            "secrets (read from the environment, never from flags)",
            f"${REDIS_URL_ENV}: the Redis URL for sessions (redis://[:password@]host:port/db, rediss://..., "
            f"redis+sentinel://...), or ${REDIS_URL_ENV}_FILE naming a file that holds it; "
            f"${API_KEYS_FILE_ENV}: the API keys file (JSON, keys stored as sha256; see `vita-audio apikey`); "
            f"${TWILIO_AUTH_TOKEN_ENV} (or ${TWILIO_AUTH_TOKEN_ENV}_FILE): the Twilio account's auth token, to "
            "verify X-Twilio-Signature on --twilio-port; "
            f"${AUDIOSOCKET_API_KEY_ENV} (or ${AUDIOSOCKET_API_KEY_ENV}_FILE): the API key every call on "
            "--audiosocket-port presents (AudioSocket carries no credential)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> "GatewaySettings":
        """The settings from parsed flags, and the Redis URL from `environ`; SettingsError names what is wrong."""
        try:
            chunk_plan = ChunkPlan.parse(args.chunk_plan)
        except ChunkPlanError as exc:
            raise SettingsError(f"--chunk-plan: {exc}") from None
        url = redis_url(environ)
        return cls(lm_dir=args.lm_dir, encoder=args.encoder, decoder=args.decoder, triton=args.triton,
                   redis_url=url, host=args.host, port=args.port,
                   metrics_port=args.metrics_port, grace_s=args.grace_s,
                   replica_id=args.replica_id or socket.gethostname(), default_mode=args.default_mode,
                   max_new_tokens=args.max_new_tokens, context_tokens=args.context_tokens, chunk_plan=chunk_plan,
                   max_utterance_s=args.max_utterance_s, realtime_slack_s=args.realtime_slack_s,
                   max_frame_bytes=args.max_frame_bytes, token_gap_s=args.token_gap_s, max_calls=args.max_calls,
                   first_message_s=args.first_message_s, idle_s=args.idle_s, max_call_s=args.max_call_s,
                   max_reader_stall_s=args.max_reader_stall_s, tls=server_tls(args), health_port=args.health_port,
                   internal_tls=internal_tls(args), redis_tls=redis_tls(args, url),
                   api_keys_file=environ.get(API_KEYS_FILE_ENV) or None, jwks_file=args.jwks_file,
                   jwt_issuer=args.jwt_issuer, jwt_audience=args.jwt_audience,
                   jwt_tenant_claim=args.jwt_tenant_claim, jwt_leeway_s=args.jwt_leeway_s,
                   allow_anonymous=args.allow_anonymous, tenant_max_calls=args.tenant_max_calls,
                   tenant_calls_per_minute=args.tenant_calls_per_minute, tenant_limits_file=args.tenant_limits_file,
                   quota_lease_s=args.quota_lease_s, history_ttl_s=args.history_ttl_s,
                   store_text=not args.no_store_text, twilio_port=args.twilio_port,
                   twilio_public_url=args.twilio_public_url,
                   twilio_auth_token=secret(TWILIO_AUTH_TOKEN_ENV, environ, required=False),
                   realtime_port=args.realtime_port,
                   twilio_preset=args.twilio_preset, audiosocket_port=args.audiosocket_port,
                   audiosocket_api_key=secret(AUDIOSOCKET_API_KEY_ENV, environ, required=False))


def _add_caller_arguments(parser: argparse.ArgumentParser) -> None:
    """Callers (who may call, as which tenant), their quotas, and the retention of their data."""
    d = GatewaySettings
    g = parser.add_argument_group(
        "callers", f"each call sends `authorization: Bearer <JWT>` or `x-api-key: <key>` metadata (API keys: "
        f"${API_KEYS_FILE_ENV}); without any source of credentials the gateway refuses to start unless "
        "--allow-anonymous")
    g.add_argument("--jwks-file", metavar="FILE", default=None,
                   help="JWKS (JSON) of the public keys that sign callers' JWTs, chosen by kid; RS256, ES256 and "
                        "EdDSA only; re-read when it changes")
    g.add_argument("--jwt-issuer", default="", help="the `iss` every JWT must carry (required with --jwks-file)")
    g.add_argument("--jwt-audience", default="", help="the `aud` every JWT must carry (required with --jwks-file)")
    g.add_argument("--jwt-tenant-claim", default=d.jwt_tenant_claim,
                   help=f"the JWT claim naming the caller's tenant (default {d.jwt_tenant_claim})")
    g.add_argument("--jwt-leeway-s", type=float, default=d.jwt_leeway_s,
                   help=f"clock skew allowed on exp, nbf and iat (default {d.jwt_leeway_s:g})")
    g.add_argument("--allow-anonymous", action="store_true",
                   help="LOCAL DEVELOPMENT ONLY: calls without credentials are served as tenant "
                        f"{keys.ANONYMOUS_TENANT!r}")
    q = parser.add_argument_group(
        "tenant quotas", "shared by every replica through Redis; over a limit a call gets RESOURCE_EXHAUSTED with "
        "google.rpc.RetryInfo")
    q.add_argument("--tenant-max-calls", type=int, default=d.tenant_max_calls,
                   help="calls one tenant may have at once over all replicas (0 = unlimited; default 0)")
    q.add_argument("--tenant-calls-per-minute", type=int, default=d.tenant_calls_per_minute,
                   help="new calls one tenant may start in any 60 s (0 = unlimited; default 0)")
    q.add_argument("--tenant-limits-file", metavar="FILE", default=None,
                   help='per-tenant limits, {"tenants": {"acme": {"max_calls": 20, "calls_per_minute": 600}}}, '
                        "over the defaults and the API keys file's own \"tenants\" section; re-read when it changes")
    q.add_argument("--quota-lease-s", type=float, default=d.quota_lease_s,
                   help="a call's slot is a lease its gateway refreshes: a killed gateway's calls stop counting "
                        f"this long after it died (default {d.quota_lease_s:g})")
    r = parser.add_argument_group("retention of stored history")
    r.add_argument("--history-ttl-s", type=int, default=d.history_ttl_s,
                   help="an idle session and its history (audio token ids, answers, text) are deleted this long "
                        f"after their last use (default {d.history_ttl_s}); HANG_UP with erase_history deletes "
                        "them at once")
    r.add_argument("--no-store-text", action="store_true",
                   help="store turns without their transcript text (the token ids a resumed call needs are kept)")


def _add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """Telephony protocol adapters: each drives the same call engine as Converse, on its own port."""
    g = parser.add_argument_group(
        "telephony adapters", "each on its own port of this process, with Converse's VAD, barge-in, history, "
        "limits, credentials and quotas")
    g.add_argument("--twilio-port", type=int, default=0,
                   help="port of the Twilio Media Streams WebSocket (bidirectional <Connect><Stream>); "
                        "TLS (wss) with --tls-cert; 0 = off (default)")
    g.add_argument("--twilio-public-url", default="",
                   help="wss://host[:port] as Twilio calls it (behind a proxy or ingress): the URL "
                        "X-Twilio-Signature signs is this plus the request's path; default wss:// and the Host "
                        f"header. The signature is checked when ${TWILIO_AUTH_TOKEN_ENV} is set")
    g.add_argument("--realtime-port", type=int, default=0,
                   help="port of the OpenAI Realtime WebSocket (the server side: point the openai SDK's "
                        "realtime client at it; GA schema, the beta one with `OpenAI-Beta: realtime=v1`); "
                        "the SDK's api_key is the caller's API key; TLS (wss) with --tls-cert; 0 = off (default)")
    g.add_argument("--twilio-preset", choices=TWILIO_PRESETS, default="twilio",
                   help="the Media Streams dialect --twilio-port speaks: twilio (audio/x-mulaw, streamSid, "
                        "customParameters; X-Twilio-Signature) or telnyx (PCMU or PCMA, stream_id, "
                        "custom_parameters; the credential may come as Telnyx's x-telnyx-streaming-auth-token "
                        "header). Default twilio")
    g.add_argument("--audiosocket-port", type=int, default=0,
                   help="port of the Asterisk AudioSocket TCP endpoint (8 kHz slin; the stream's UUID names the "
                        "session). Plaintext TCP: keep it internal to the PBX's network. Its calls present "
                        f"${AUDIOSOCKET_API_KEY_ENV} as their API key (anonymous without it). 0 = off (default)")


def _where(name: str) -> str:
    """Where a setting comes from, for error messages: its flag, or the environment for the secret."""
    if name == "redis_url":
        return f"${REDIS_URL_ENV} (or ${REDIS_URL_ENV}_FILE)"
    return {"lm_dir": "--lm", "default_mode": "--mode"}.get(name, "--" + name.replace("_", "-"))
