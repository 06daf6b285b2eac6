"""The clients and loaded models a gateway talks and thinks through, built once at start-up, closed at shutdown.

Everything slow (the text tokenizer, config.json, the silero VAD's TorchScript) loads in a worker
thread here, never on the event loop at a call's first frame; gRPC, Triton and Redis clients are
made on the loop they will run on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tokenizers import Tokenizer

from vitaserve.common import metrics
from vitaserve.common.session_store import SessionStore, connect_redis
from vitaserve.common.settings import SettingsError
from vitaserve.gateway.auth import AuthConfigError, Authenticator, JwtRules, ReloadingFile
from vitaserve.gateway.backends import DecoderClient, EncoderClient
from vitaserve.gateway.generator_client import GeneratorClient
from vitaserve.gateway.quota import Quotas, TenantLimits, load_tenant_limits_file
from vitaserve.gateway.settings import GatewaySettings
from vitaserve.gateway.vad import SileroVad, shared_model
from vitaserve.lmtext.config import LMConfig
from vitaserve.lmtext.prompt import PromptBuilder
from vitaserve.lmtext.text_tokenizer import load_text_tokenizer
from vitaserve.lmtext.vocab import AudioVocab


@dataclass(frozen=True)
class GatewayDeps:
    settings: GatewaySettings
    encoder: EncoderClient
    decoder: DecoderClient
    generator: GeneratorClient
    store: SessionStore
    text_tokenizer: Tokenizer
    vocab: AudioVocab
    prompts: PromptBuilder
    vad_model: SileroVad   # one per process; each call's VoiceActivityDetector keeps its own state
    num_mtp_modules: int   # from the checkpoint's config.json: modes are validated when a call opens
    auth: Authenticator    # who calls, as which tenant (gateway/auth.py)
    quotas: Quotas         # per-tenant call limits shared through Redis (gateway/quota.py)

    async def aclose(self) -> None:
        """Close every client; each is closed even when another fails to."""
        results = await asyncio.gather(self.encoder.close(), self.decoder.close(), self.generator.close(),
                                       self.store.redis.aclose(), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]


def build_auth(settings: GatewaySettings) -> Authenticator:
    """The callers' credentials; SettingsError when there is no way to authenticate anyone (and
    anonymous callers were not asked for) or a key file is unusable: the gateway does not start."""
    if not (settings.api_keys_file or settings.jwks_file or settings.allow_anonymous):
        raise SettingsError("no way to authenticate callers: give API keys ($VITA_API_KEYS_FILE), a JWKS "
                            "(--jwks-file with --jwt-issuer and --jwt-audience), or --allow-anonymous "
                            "(local development only)")
    rules = (JwtRules(settings.jwt_issuer, settings.jwt_audience, settings.jwt_tenant_claim, settings.jwt_leeway_s)
             if settings.jwks_file else None)
    try:
        return Authenticator(settings.api_keys_file, settings.jwks_file, rules, settings.allow_anonymous)
    except AuthConfigError as exc:
        raise SettingsError(str(exc)) from None


def build_quotas(settings: GatewaySettings, store: SessionStore, auth: Authenticator) -> Quotas:
    """Limits: the defaults, over them the API keys file's "tenants", over those the limits file."""
    try:
        limits_file = (ReloadingFile(settings.tenant_limits_file, load_tenant_limits_file, "tenant limits file")
                       if settings.tenant_limits_file else None)
    except AuthConfigError as exc:
        raise SettingsError(f"--tenant-limits-file: {exc}") from None

    def overrides() -> dict[str, TenantLimits]:
        return {**auth.tenant_overrides(), **(limits_file.get() if limits_file is not None else {})}

    return Quotas(store.redis, TenantLimits(settings.tenant_max_calls, settings.tenant_calls_per_minute), overrides,
                  namespace=store.namespace, lease_s=settings.quota_lease_s, retry=store.retry)


def _load(lm_dir: str) -> tuple[Tokenizer, int, SileroVad]:
    """(text tokenizer, MCTP modules, VAD model): the slow part, for a worker thread."""
    return load_text_tokenizer(lm_dir), LMConfig.from_folder(lm_dir).num_nextn_predict_layers, shared_model()


async def build_deps(settings: GatewaySettings) -> GatewayDeps:
    auth = build_auth(settings)  # first: a gateway nobody could call does not load a model
    tokenizer, num_mtp_modules, vad_model = await asyncio.to_thread(_load, settings.lm_dir)
    store = SessionStore(connect_redis(settings.redis_url, tls=settings.redis_tls),  # first: a malformed URL fails before any channel
                         session_ttl_s=settings.history_ttl_s, store_text=settings.store_text,
                         on_retry=lambda what, attempt, exc: metrics.STORE_RETRIES.labels(what).inc())
    quotas = build_quotas(settings, store, auth)  # before any channel: nothing to close if its file is bad
    tls = settings.internal_tls  # the same client identity on each internal hop
    return GatewayDeps(settings=settings, encoder=EncoderClient(settings.encoder, tls=tls),
                       decoder=DecoderClient(settings.decoder, tls=tls),
                       generator=GeneratorClient(settings.triton, token_gap_s=settings.token_gap_s, tls=tls),
                       store=store, text_tokenizer=tokenizer, vocab=AudioVocab.from_tokenizer(tokenizer),
                       prompts=PromptBuilder(tokenizer), vad_model=vad_model, num_mtp_modules=num_mtp_modules,
                       auth=auth, quotas=quotas)
