"""Generation without HF `generate`: a stream of tokens, each tagged backbone/MCTP and audio/text.

`LanguageModel` is a loaded checkpoint (weights, config, generation defaults, id layout);
`generate()` yields one `TokenEvent` per new token the moment it exists, so audio can leave at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vitaserve.lmtext.config import GenerationDefaults, LMConfig
from vitaserve.generator.loader import load_lm, parse_dtype
from vitaserve.generator.model import VitaAudioLM
from vitaserve.generator.runner import run_step
from vitaserve.generator.sampling import make_generator
from vitaserve.lmtext.sampling_params import SamplingParams
from vitaserve.lmtext.schedule import Schedule
from vitaserve.generator.sequence import Sequence
from vitaserve.lmtext.vocab import AUDIO_CODEBOOK_SIZE, AudioVocab


@dataclass(frozen=True)
class TokenEvent:
    index: int  # 0-based among the new tokens
    token_id: int
    kind: str  # "M": backbone step, "m": MCTP step
    module: int  # MCTP module index, -1 for backbone
    is_audio: bool
    elapsed_s: float  # from the start of generation (prefill included) until this token existed
    finished: bool  # last token of the call (an end id, or max_new_tokens reached)


@dataclass
class LanguageModel:
    model: VitaAudioLM
    config: LMConfig
    defaults: GenerationDefaults
    vocab: AudioVocab
    folder: Path

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
        max_len: int = 4096, num_slots: int = 1, mtp_audio_head: bool = False,
    ) -> "LanguageModel":
        """mtp_audio_head: the optional MCTP speed-up that changes results (see VitaAudioLM)."""
        folder = Path(folder)
        model = load_lm(folder, device=device, dtype=parse_dtype(dtype))
        model.setup_caches(num_slots, min(max_len, model.config.max_position_embeddings))
        cfg = model.config
        vocab = AudioVocab.from_config(cfg.bos_token_id, cfg.vocab_size)
        if mtp_audio_head:
            model.mtp_audio_rows = slice(vocab.audio_offset, vocab.audio_offset + AUDIO_CODEBOOK_SIZE)
        return cls(model, cfg, GenerationDefaults.from_folder(folder), vocab, folder)

    def schedule(self, mode: str | list[int] | None) -> Schedule:
        """A named or custom mode; None means the checkpoint's own generation_config default."""
        if mode is None:
            mode = list(self.defaults.mtp_inference_mode or [1, self.config.num_nextn_predict_layers])
        return Schedule.parse(mode, self.config.num_nextn_predict_layers)

    def stop_ids(self) -> tuple[int, ...]:
        if self.defaults.eos_token_ids:
            return self.defaults.eos_token_ids
        eos = self.config.eos_token_id
        return tuple([eos] if isinstance(eos, int) else eos or [])


def validate_prompt(lm: LanguageModel, prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < lm.config.vocab_size]
    if bad:
        raise ValueError(f"prompt ids outside [0, {lm.config.vocab_size}): {bad[:8]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens > lm.model.max_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the context "
            f"({lm.model.max_len} tokens)"
        )


def generate(
    lm: LanguageModel,
    prompt_ids: list[int],
    mode: str | list[int] | None = None,
    sampling: SamplingParams | None = None,
    max_new_tokens: int = 256,
    stop_ids: tuple[int, ...] | None = None,
    slot: int = 0,
) -> Iterator[TokenEvent]:
    """Stream new tokens for one call; with the official schedule, sampling rules and end ids."""
    validate_prompt(lm, prompt_ids, max_new_tokens)
    sampling = sampling or SamplingParams.from_defaults(lm.defaults)
    stop = set(lm.stop_ids() if stop_ids is None else stop_ids)
    device = lm.model.lm_head.weight.device
    seq = Sequence(
        slot=slot, ids=list(prompt_ids), schedule=lm.schedule(mode), num_modules=lm.config.num_nextn_predict_layers,
        sampling=sampling, generator=make_generator(sampling, device),
    )
    start = time.perf_counter()
    for index in range(max_new_tokens):
        kind, module = seq.next_step
        (token,) = run_step(lm.model, [seq.plan()])
        if isinstance(token, Exception):
            raise token
        if device.type == "cuda":
            torch.cuda.synchronize()
        finished = token in stop or index == max_new_tokens - 1
        yield TokenEvent(index, token, kind, module, lm.vocab.is_audio(token), time.perf_counter() - start, finished)
        if finished:
            return
