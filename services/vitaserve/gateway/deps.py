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
from vitaserve.gateway.backends import DecoderClient, EncoderClient
from vitaserve.gateway.generator_client import GeneratorClient
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

    async def aclose(self) -> None:
        """Close every client; each is closed even when another fails to."""
        results = await asyncio.gather(self.encoder.close(), self.decoder.close(), self.generator.close(),
                                       self.store.redis.aclose(), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]


def _load(lm_dir: str) -> tuple[Tokenizer, int, SileroVad]:
    """(text tokenizer, MCTP modules, VAD model): the slow part, for a worker thread."""
    return load_text_tokenizer(lm_dir), LMConfig.from_folder(lm_dir).num_nextn_predict_layers, shared_model()


async def build_deps(settings: GatewaySettings) -> GatewayDeps:
    tokenizer, num_mtp_modules, vad_model = await asyncio.to_thread(_load, settings.lm_dir)
    store = SessionStore(connect_redis(settings.redis_url, tls=settings.redis_tls),  # first: a malformed URL fails before any channel
                         on_retry=lambda what, attempt, exc: metrics.STORE_RETRIES.labels(what).inc())
    tls = settings.internal_tls  # the same client identity on each internal hop
    return GatewayDeps(settings=settings, encoder=EncoderClient(settings.encoder, tls=tls),
                       decoder=DecoderClient(settings.decoder, tls=tls),
                       generator=GeneratorClient(settings.triton, token_gap_s=settings.token_gap_s, tls=tls),
                       store=store, text_tokenizer=tokenizer, vocab=AudioVocab.from_tokenizer(tokenizer),
                       prompts=PromptBuilder(tokenizer), vad_model=vad_model, num_mtp_modules=num_mtp_modules)
