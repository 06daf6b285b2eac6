"""`LanguageModel`: a loaded VITA-Audio checkpoint (weights, config, generation defaults, id layout).

What the engine needs to know about a model besides its forward: the schedule of a mode, the end ids,
and whether a prompt fits the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vitaserve.common.audio_facts import AUDIO_CODEBOOK_SIZE
from vitaserve.generator.loader import load_lm, parse_dtype
from vitaserve.generator.model import VitaAudioLM
from vitaserve.lmtext.config import GenerationDefaults, LMConfig
from vitaserve.lmtext.schedule import Schedule
from vitaserve.lmtext.vocab import AudioVocab


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
        if model.lm_head.weight.device.type == "cuda":  # decode steps replayed as CUDA graphs (never on the CPU)
            from vitaserve.generator.cuda_graphs import DecodeGraphs

            DecodeGraphs.attach(model)
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

    def validate_prompt(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        """ValueError with one clear line for a prompt the engine cannot run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt ids outside [0, {self.config.vocab_size}): {bad[:8]}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > self.model.max_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the context "
                f"({self.model.max_len} tokens)"
            )
