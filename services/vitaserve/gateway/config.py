"""The gateway's settings and the clients it talks through, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from vitaserve.common.session_store import SessionStore
from vitaserve.gateway.backends import DecoderClient, EncoderClient
from vitaserve.gateway.generator_client import GeneratorClient
from vitaserve.lmtext.prompt import PromptBuilder
from vitaserve.lmtext.vocab import AudioVocab


@dataclass(frozen=True)
class GatewayConfig:
    default_mode: str = "boost"
    max_new_tokens: int = 1024
    context_tokens: int = 4096            # the generator's context (Triton's max_len): prompt + answer
    chunk_plan: str = "vita"              # decoder block sizes (gateway.chunker presets)
    max_utterance_s: float = 30.0         # longer turns: VAD cuts them; push-to-talk gets OUT_OF_RANGE
    realtime_slack_s: float = 2.0         # audio may run this far ahead of the wall clock
    max_frame_bytes: int = 64 * 1024      # one AudioFrame
    replica_id: str = "gateway"


@dataclass
class GatewayDeps:
    config: GatewayConfig
    encoder: EncoderClient
    decoder: DecoderClient
    generator: GeneratorClient
    store: SessionStore
    text_tokenizer: Tokenizer
    vocab: AudioVocab
    prompts: PromptBuilder
    num_mtp_modules: int  # from the checkpoint's config.json: modes are validated when a call opens
