"""GLM-4-Voice audio decoder: audio token ids (12.5 Hz) -> 22050 Hz waveform, one shot or streamed.

`decode_chunk` is the official `AudioDecoder.token2wav` (fork 54d6672, with option_steps = ODE steps)
driven as GLM-4-Voice's web demo drives it: each block's flow prompt is every earlier token and every
mel that token2wav RETURNED (1 HiFT-cache frame included, the 34 held-back overlap frames excluded),
the new mel is cross-faded with the held-back overlap (Hamming, 34 frames), the last vocoded frame
and 256 source samples are carried into the next block, and the last block is finalized.
All of that lives in a `DecoderStreamState` value, so a stream can move between replicas.

`decode_chunks` decodes one block of each of several streams in one flow and one HiFT forward when
their shapes are equal (`batch_key`: the same block of streams cut by the same chunk plan), which
is how the decoder service serves concurrent calls; every stream keeps its own generator.

`mode="vita_redecode"` is VITA-Audio's web_demo_stream.py instead: every chunk re-decodes ALL tokens
so far in one shot (1 ODE step for the first chunk, then +2 per chunk up to 10), later chunks only
when more than 16 new tokens wait, and sends the new tail of the waveform.

Differences from the official code, on purpose: modules run in eval mode (the official never calls
.eval(), so flow dropout stays on there); randomness comes from a per-stream generator (re-seeded
with 42 before every flow call by default, exactly the official global-RNG sequence on CPU), not
the process-wide RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from vitaserve.common.audio_facts import AUDIO_CODEBOOK_SIZE, DECODER_RATE, GLM4VOICE_BLOCKS, HOP, TOKENS_PER_SECOND
from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.decoder.hift import HiftConfig, HiFTGenerator, load_hift
from vitaserve.decoder.stream_state import DecoderStreamState

TOKEN_OVERLAP = 5  # tokens of mel held back and cross-faded (-> 34 frames)
HIFT_CACHE_FRAMES = 1
SOURCE_CACHE = HIFT_CACHE_FRAMES * HOP  # 256 samples
VITA_MIN_NEW_TOKENS = 16  # re-decode only when MORE than this many tokens are new
VITA_RESET_TOKENS = 512  # past this many tokens the re-decode starts over from the next tokens
VITA_MAX_ODE_STEPS = 10


def split_blocks(tokens: Sequence[int], chunk_sizes: Sequence[int] = GLM4VOICE_BLOCKS) -> list[list[int]]:
    """Cut tokens into consecutive blocks of chunk_sizes (the last size repeating); the last block
    is what remains (1..size tokens), as when the web demo's stream ends."""
    if not chunk_sizes or any(int(c) <= 0 for c in chunk_sizes):
        raise ValueError(f"chunk sizes must be positive integers, got {list(chunk_sizes)}")
    blocks, i, k = [], 0, 0
    while i < len(tokens):
        size = int(chunk_sizes[min(k, len(chunk_sizes) - 1)])
        blocks.append(list(tokens[i : i + size]))
        i, k = i + size, k + 1
    return blocks


def check_tokens(tokens: Iterable[int], allow_empty: bool = False) -> list[int]:
    """Audio token ids as a list of ints in [0, 16384); ValueError with one clear line otherwise."""
    out = [int(t) for t in tokens]
    if not out and not allow_empty:
        raise ValueError("no audio tokens to decode")
    bad = [t for t in out if not 0 <= t < AUDIO_CODEBOOK_SIZE]
    if bad:
        raise ValueError(f"audio token ids must be in [0, {AUDIO_CODEBOOK_SIZE}); got {bad[:5]}"
                         + (" ..." if len(bad) > 5 else ""))
    return out


def hamming_cross_fade(new_mel: torch.Tensor, old_tail: torch.Tensor, window: np.ndarray) -> torch.Tensor:
    """Fade the first n frames of new_mel in and old_tail's n frames out (n = len(window) / 2).

    The official multiplies a float tensor by a float64 numpy window, so the blend is computed in
    float64 and rounded back once; done the same way here for identical values.
    """
    n = window.shape[0] // 2
    w = torch.from_numpy(window)
    out = new_mel.clone()
    head = new_mel[..., :n].cpu().to(torch.float64) * w[:n] + old_tail[..., -n:].cpu().to(torch.float64) * w[n:]
    out[..., :n] = head.to(new_mel.dtype).to(new_mel.device)
    return out


@dataclass(frozen=True)
class Block:
    """One block of one stream: what decode_chunk takes, as one value (decode_chunks takes several)."""

    state: DecoderStreamState
    tokens: tuple[int, ...]
    finalize: bool = False
    ode_steps: int | None = None  # None: 10 (official) or the VITA-Audio schedule (vita_redecode)


class AudioDecoder:
    """Flow (tokens -> mel) + HiFT (mel -> speech); eval mode, one instance serves many streams."""

    def __init__(self, flow: torch.nn.Module, hift: HiFTGenerator, input_frame_rate: float = TOKENS_PER_SECOND,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.flow = flow.eval()
        self.hift = hift.eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.input_frame_rate = input_frame_rate
        self.mel_overlap_len = int(TOKEN_OVERLAP / input_frame_rate * DECODER_RATE / HOP)  # 34
        self.mel_window = np.hamming(2 * self.mel_overlap_len)

    @classmethod
    def from_pretrained(cls, decoder_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "AudioDecoder":
        """A GLM-4-Voice decoder folder: config.yaml, flow.pt, hift.pt (strict key checks)."""
        from vitaserve.decoder.flow import load_flow
        from vitaserve.decoder.yaml_config import load_decoder_yaml

        decoder_dir = Path(decoder_dir)
        if not (decoder_dir / "config.yaml").exists():
            raise CheckpointError(f"{decoder_dir}: no config.yaml (expected a GLM-4-Voice decoder folder)")
        cfg = load_decoder_yaml(decoder_dir / "config.yaml")
        flow = load_flow(decoder_dir, device=device, dtype=dtype)
        hift = load_hift(decoder_dir / "hift.pt", HiftConfig.from_yaml_dict(cfg["hift"]), device=device, dtype=dtype)
        return cls(flow, hift, float(cfg["flow"].get("input_frame_rate", TOKENS_PER_SECOND)), device, dtype)

    # ---- randomness -------------------------------------------------------------------------

    def _generators(self, state: DecoderStreamState) -> tuple[torch.Generator | None, torch.Generator | None]:
        """(device generator, CPU generator for the SineGen phases on CUDA) for one flow+HiFT call.

        The official draws, in order: flow start noise, SineGen phases (always a CPU draw), SineGen
        noise, source noise. On CPU one generator gives exactly that sequence after manual_seed(42).
        """
        if state.deterministic:
            return None, None
        gen = torch.Generator(device=self.device)
        phase_gen = torch.Generator() if self.device.type != "cpu" else None
        if state.seeding == "per_block" or state.rng_state.numel() == 0:
            gen.manual_seed(state.seed)
            if phase_gen is not None:
                phase_gen.manual_seed(state.seed)
        else:
            if state.rng_device != self.device.type:
                raise ValueError(f"stream state carries a {state.rng_device} generator; this decoder runs on {self.device.type}")
            gen.set_state(state.rng_state)
            if phase_gen is not None:
                phase_gen.set_state(state.phase_rng_state)
        return gen, phase_gen

    @staticmethod
    def _save_generators(state: DecoderStreamState, gen, phase_gen) -> None:
        if state.seeding == "per_stream" and gen is not None:
            state.rng_state = gen.get_state().cpu()
            state.rng_device = gen.device.type
            state.phase_rng_state = phase_gen.get_state() if phase_gen is not None else torch.zeros(0, dtype=torch.uint8)

    # ---- the two stages, batched over streams whose blocks have equal shapes ------------------

    def _flow(self, tokens: list[list[int]], states: list[DecoderStreamState], ode_steps: int, gen) -> torch.Tensor:
        """Mel [B, 80, n] of each stream's new tokens, with its tokens and mels so far as the flow prompt."""
        dev = self.device
        token = torch.tensor(tokens, dtype=torch.int64, device=dev)
        prompt_token = torch.stack([s.prompt_tokens for s in states]).to(device=dev, dtype=torch.int64)
        prompt_feat = torch.stack([s.prompt_mel.t() for s in states]).to(device=dev, dtype=self.dtype)  # [B, M, 80]
        embedding = torch.cat([s.embedding for s in states]).to(device=dev, dtype=self.dtype)
        return self.flow.inference(
            token=token, token_len=token.shape[1], prompt_token=prompt_token, prompt_token_len=prompt_token.shape[1],
            prompt_feat=prompt_feat, prompt_feat_len=prompt_feat.shape[1], embedding=embedding,
            n_timesteps=int(ode_steps), generator=gen, deterministic=states[0].deterministic,
        )

    def _vocode(self, mel: torch.Tensor, cache_source: torch.Tensor | None, deterministic: bool,
                gen, phase_gen) -> tuple[torch.Tensor, torch.Tensor]:
        if mel.shape[2] == 0:
            min_tokens = int(np.ceil((self.mel_overlap_len + 1) * self.input_frame_rate * HOP / DECODER_RATE))
            raise ValueError(
                f"block too short: a non-final first block must give more than {self.mel_overlap_len} mel "
                f"frames (at least {min_tokens} tokens)")
        return self.hift.inference(mel, cache_source, generator=gen, deterministic=deterministic,
                                   phase_generator=phase_gen)

    # ---- public API -------------------------------------------------------------------------

    def start_stream(self, mode: str = "official", deterministic: bool = False, seed: int = 42,
                     seeding: str = "per_block", embedding: torch.Tensor | None = None) -> DecoderStreamState:
        """A fresh stream. embedding: speaker x-vector [1, 192] (zeros, as GLM-4-Voice uses it)."""
        state = DecoderStreamState(mode=mode, deterministic=deterministic, seed=seed, seeding=seeding)
        if embedding is not None:
            state.embedding = embedding.detach().to("cpu", torch.float32).reshape(1, -1)
        if seeding == "per_stream" and not deterministic:
            gen, phase_gen = self._generators(state)  # seeded once here, carried from now on
            self._save_generators(state, gen, phase_gen)
        return state

    @staticmethod
    def batch_key(block: Block) -> tuple | None:
        """Blocks with equal keys can share one flow and one HiFT forward (decode_chunks): every
        tensor of theirs has the same shape. That is the same block of streams cut by the same chunk
        plan (e.g. the first 10-token blocks of calls that start together). None: the block runs alone
        (re-decode mode, whose shapes are its whole history, or a stream that is already finalized)."""
        s = block.state
        if s.mode != "official" or s.finalized:
            return None
        steps = 10 if block.ode_steps is None else int(block.ode_steps)
        return (len(block.tokens), s.tokens_done, s.prompt_mel.shape[1], s.mel_overlap.shape[1],
                s.hift_cache_mel.shape[1], s.hift_cache_source.shape[0], steps, bool(block.finalize),
                s.deterministic)

    @torch.inference_mode()
    def decode_chunk(self, state: DecoderStreamState, tokens: Sequence[int], finalize: bool = False,
                     ode_steps: int | None = None) -> tuple[np.ndarray, DecoderStreamState]:
        """Decode one block; returns (float32 PCM at 22050 Hz, the new state). `state` is unchanged.

        ode_steps: flow Euler steps (option_steps); None means 10 in official mode and the VITA-Audio
        schedule (1, 3, 5, ...) in vita_redecode mode.
        """
        return self.decode_chunks([Block(state, tuple(tokens), finalize, ode_steps)])[0]

    @torch.inference_mode()
    def decode_chunks(self, blocks: Sequence[Block]) -> list[tuple[np.ndarray, DecoderStreamState]]:
        """decode_chunk for one block of each of several streams, in one flow and one HiFT forward.

        The blocks must share one `batch_key`. Each stream draws its noise from its own generator, so
        each result equals that block decoded alone (to float tolerance: batched GEMMs block
        differently); one block alone runs exactly decode_chunk's ops.
        """
        if not blocks:
            return []
        checked = []
        for block in blocks:
            if block.state.finalized:
                raise ValueError("this stream was finalized; start a new one")
            mode = block.state.mode
            checked.append(check_tokens(block.tokens, allow_empty=block.finalize or mode == "vita_redecode"))
        if len(blocks) == 1 and blocks[0].state.mode == "vita_redecode":
            b = blocks[0]
            return [self._redecode_chunk(b.state, checked[0], b.finalize, b.ode_steps)]
        keys = {self.batch_key(b) for b in blocks}
        if len(keys) != 1 or None in keys:
            raise ValueError("blocks decoded together must be official-mode blocks of equal shapes (one batch_key)")
        return self._decode_official(blocks, checked)

    def _decode_official(self, blocks: Sequence[Block], tokens: list[list[int]]):
        news = [b.state.copy() for b in blocks]
        first, finalize = blocks[0], blocks[0].finalize
        steps = 10 if first.ode_steps is None else int(first.ode_steps)
        deterministic = news[0].deterministic
        pairs = [self._generators(s) for s in news]
        gen = phase_gen = None
        if not deterministic:  # one generator per row: a stream draws what it would alone
            gen = [g for g, _ in pairs]
            phases = [p for _, p in pairs]
            phase_gen = None if all(p is None for p in phases) else phases
        if tokens[0]:
            mel = self._flow(tokens, news, steps, gen).to(self.dtype)
            if news[0].mel_overlap.shape[1] > 0:
                overlap = torch.stack([s.mel_overlap for s in news]).to(mel)
                mel = hamming_cross_fade(mel, overlap, self.mel_window)
        else:
            # finalize with no new tokens (the stream ended on a block boundary): vocode the held-back
            # overlap; the official web demo would drop these frames
            mel = torch.stack([s.mel_overlap for s in news]).to(device=self.device, dtype=self.dtype)
        cache_source = None
        if news[0].hift_cache_mel.shape[1] > 0:
            mel = torch.cat([torch.stack([s.hift_cache_mel for s in news]).to(mel), mel], dim=2)
            cache_source = torch.stack([s.hift_cache_source for s in news]).to(self.device, torch.float32)[:, None]
        if not finalize:
            overlaps = mel[:, :, -self.mel_overlap_len :].float().cpu()
            mel = mel[:, :, : -self.mel_overlap_len]
            speech, source = self._vocode(mel, cache_source, deterministic, gen, phase_gen)
            for i, new in enumerate(news):
                new.mel_overlap = overlaps[i].clone()
                new.hift_cache_mel = mel[i, :, -HIFT_CACHE_FRAMES:].float().cpu()
                new.hift_cache_source = source[i, 0, -SOURCE_CACHE:].float().cpu()
            speech = speech[:, :-SOURCE_CACHE]
        else:
            if mel.shape[2]:
                speech, _ = self._vocode(mel, cache_source, deterministic, gen, phase_gen)
            else:
                speech = mel.new_zeros(len(news), 0)
            for new in news:
                new.mel_overlap = new.mel_overlap[:, :0]
                new.hift_cache_mel = new.hift_cache_mel[:, :0]
                new.hift_cache_source = new.hift_cache_source[:0]
                new.finalized = True
        mel_cpu, speech_cpu = mel.float().cpu(), speech.float().cpu()
        out = []
        for i, (new, (g, p)) in enumerate(zip(news, pairs)):
            self._save_generators(new, g, p)
            new.prompt_mel = torch.cat([new.prompt_mel, mel_cpu[i]], dim=1)
            new.prompt_tokens = torch.cat([new.prompt_tokens, torch.tensor(tokens[i], dtype=torch.int32)])
            new.blocks_done += 1
            pcm = speech_cpu[i].numpy()
            new.samples_out += pcm.shape[0]
            out.append((pcm, new))
        return out

    def _redecode_chunk(self, state, tokens, finalize, ode_steps):
        new = state.copy()
        new.prompt_tokens = torch.cat([new.prompt_tokens, torch.tensor(tokens, dtype=torch.int32)])
        n = new.tokens_done
        waiting = n - new.decoded_tokens
        due = waiting > 0 and (new.blocks_done == 0 or waiting > VITA_MIN_NEW_TOKENS or finalize)
        if not due:
            new.finalized = finalize
            return np.zeros(0, dtype=np.float32), new
        steps = new.next_ode_steps if ode_steps is None else int(ode_steps)
        full = self._one_shot(new.prompt_tokens.tolist(), steps, new)
        pcm = full[new.decoded_samples:]
        new.next_ode_steps = min(new.next_ode_steps + 2, VITA_MAX_ODE_STEPS)
        new.blocks_done += 1
        new.samples_out += pcm.shape[0]
        if n > VITA_RESET_TOKENS:  # start over: the next chunk re-decodes only the tokens after this
            new.prompt_tokens = new.prompt_tokens[:0]
            new.decoded_tokens, new.decoded_samples = 0, 0
        else:
            new.decoded_tokens, new.decoded_samples = n, full.shape[0]
        new.finalized = finalize
        return pcm, new

    def _one_shot(self, tokens: list[int], ode_steps: int, like: DecoderStreamState) -> np.ndarray:
        """token2wav(finalize=True) with no prompt and no caches."""
        fresh = DecoderStreamState(deterministic=like.deterministic, seed=like.seed, seeding=like.seeding,
                                   embedding=like.embedding, rng_state=like.rng_state,
                                   phase_rng_state=like.phase_rng_state, rng_device=like.rng_device)
        pcm, after = self.decode_chunk(fresh, tokens, finalize=True, ode_steps=ode_steps)
        like.rng_state, like.phase_rng_state = after.rng_state, after.phase_rng_state
        return pcm

    def decode(self, tokens: Sequence[int], ode_steps: int = 10, deterministic: bool = False, seed: int = 42,
               embedding: torch.Tensor | None = None) -> np.ndarray:
        """One shot, as the official offline_inference / VITA-Audio's decode: float32 PCM, 22050 Hz."""
        state = self.start_stream(deterministic=deterministic, seed=seed, embedding=embedding)
        pcm, _ = self.decode_chunk(state, tokens, finalize=True, ode_steps=ode_steps)
        return pcm

    def decode_stream(self, tokens: Sequence[int], chunk_sizes: Sequence[int] = GLM4VOICE_BLOCKS,
                      ode_steps: int | Sequence[int] = 10, deterministic: bool = False, seed: int = 42,
                      seeding: str = "per_block") -> list[np.ndarray]:
        """The web demo's streaming over a whole token list: one PCM chunk per block, last finalized.
        ode_steps: one value for every block, or one per block (the last repeating)."""
        blocks = split_blocks(check_tokens(tokens), chunk_sizes)
        steps = [ode_steps] if isinstance(ode_steps, int) else list(ode_steps)
        state = self.start_stream(deterministic=deterministic, seed=seed, seeding=seeding)
        out = []
        for i, block in enumerate(blocks):
            pcm, state = self.decode_chunk(state, block, finalize=i == len(blocks) - 1,
                                           ode_steps=steps[min(i, len(steps) - 1)])
            out.append(pcm)
        return out
