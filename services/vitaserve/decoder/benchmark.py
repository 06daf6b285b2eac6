"""Codec benchmark: speech tokenizer speed and GLM-4-Voice decoder latency / real-time factor.

Each measurement follows an uncounted warm-up of the same call. Numbers, as DESIGN.md defines them:
  tokenizer_ms_per_audio_s          ms of tokenizer time per second of 16 kHz speech
  decoder_first_pcm_ms              first block of 25 tokens, 10 ODE steps, not final (official stream)
  decoder_first_pcm_ms_10tok_1step  VITA-Audio's first chunk: 10 tokens one shot, 1 ODE step
  decoder_rtf_oneshot               real-time factor = wall seconds / audio seconds (lower is faster;
                                    < 1 is faster than real time), 125 tokens (10 s) one shot
  decoder_rtf_stream                the same 125 tokens streamed in blocks 25, 50, 50 (last final)
  decoder_batch                     cross-stream batching, per batch size B: the first 10-token
                                    blocks of B streams (10 ODE steps) in one decode_chunks call
                                    against B decode_chunk calls one after another: ms of each and
                                    the speed-up (what the decoder service gains under concurrency)
Run: python -m vitaserve.decoder.benchmark --decoder DIR [--tokenizer DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vitaserve.common.audio_facts import AUDIO_CODEBOOK_SIZE, DECODER_RATE, TOKENS_PER_SECOND, VITA_FIRST_BLOCK
from vitaserve.common.provenance import git_commit
from vitaserve.decoder.audio_decoder import AudioDecoder, Block

ANSWER_TOKENS = int(10 * TOKENS_PER_SECOND)  # a 10 s answer
STREAM_BLOCKS = (25, 50, 50)
BATCH_SIZES = (1, 2, 4, 8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int = 1):
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def decoder_numbers(decoder: AudioDecoder, ode_steps: int = 10, seed: int = 0,
                    stream_blocks=STREAM_BLOCKS, answer_tokens: int = ANSWER_TOKENS) -> dict:
    """The four decoder numbers for one loaded decoder (random tokens, the official seeding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, AUDIO_CODEBOOK_SIZE, answer_tokens).tolist()
    dev = decoder.device
    out: dict = {}

    def first_block():
        return decoder.decode_chunk(decoder.start_stream(), tokens[:25], finalize=False, ode_steps=ode_steps)

    _, dt = _timed(first_block, dev)
    out["decoder_first_pcm_ms"] = round(dt * 1000, 1)

    def vita_first():
        return decoder.decode_chunk(decoder.start_stream(mode="vita_redecode"), tokens[:10], finalize=False)

    (pcm, _), dt = _timed(vita_first, dev)
    out["decoder_first_pcm_ms_10tok_1step"] = round(dt * 1000, 1)

    pcm, dt = _timed(lambda: decoder.decode(tokens, ode_steps=ode_steps), dev)
    out["decoder_rtf_oneshot"] = round(dt / (pcm.shape[0] / DECODER_RATE), 3)

    def stream():
        return decoder.decode_stream(tokens, stream_blocks, ode_steps=ode_steps)

    chunks, dt = _timed(stream, dev)
    out["decoder_rtf_stream"] = round(dt / (sum(c.shape[0] for c in chunks) / DECODER_RATE), 3)
    return out


def batch_numbers(decoder: AudioDecoder, batch_sizes=BATCH_SIZES, ode_steps: int = 10, seed: int = 0) -> list[dict]:
    """Batched vs one-by-one first blocks of B different streams, for each B."""
    rng = np.random.default_rng(seed)
    dev = decoder.device
    rows = []
    for b in batch_sizes:
        blocks = [Block(decoder.start_stream(), tuple(rng.integers(0, AUDIO_CODEBOOK_SIZE, VITA_FIRST_BLOCK).tolist()),
                        False, ode_steps) for _ in range(b)]
        _, batched = _timed(lambda: decoder.decode_chunks(blocks), dev)
        _, serial = _timed(lambda: [decoder.decode_chunks([blk]) for blk in blocks], dev)
        rows.append({"batch": b, "batched_ms": round(batched * 1000, 1), "one_by_one_ms": round(serial * 1000, 1),
                     "ms_per_block": round(batched * 1000 / b, 1), "speedup": round(serial / batched, 2)})
    return rows


def tokenizer_number(tokenizer_dir: str | Path, device: str) -> dict:
    """tokenizer_ms_per_audio_s from the encoder's own benchmark, or {} when that is not built."""
    try:
        from vitaserve.encoder.benchmark import tokenizer_ms_per_audio_s
        from vitaserve.encoder.tokenizer import SpeechTokenizer
    except ImportError:
        return {}
    tok = SpeechTokenizer.from_pretrained(tokenizer_dir, device=device)
    return {"tokenizer_ms_per_audio_s": round(float(tokenizer_ms_per_audio_s(tok)), 1)}


def run_codec_benchmark(tokenizer_dir: str | Path | None, decoder_dir: str | Path, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, batch_sizes=BATCH_SIZES) -> dict:
    """One JSON-able dict: the numbers above plus device, threads, commit and the decoder's sizes."""
    result: dict = {"device": device, "dtype": str(dtype).removeprefix("torch."),
                    "threads": torch.get_num_threads(), "commit": git_commit()}
    if tokenizer_dir is not None:
        result.update(tokenizer_number(tokenizer_dir, device))
    decoder = AudioDecoder.from_pretrained(decoder_dir, device=device, dtype=dtype)
    result["flow_params"] = sum(p.numel() for p in decoder.flow.parameters())
    result["hift_params"] = sum(p.numel() for p in decoder.hift.parameters())
    result.update(decoder_numbers(decoder))
    result["decoder_batch"] = batch_numbers(decoder, batch_sizes)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    print(json.dumps(run_codec_benchmark(args.tokenizer, args.decoder, args.device)))


if __name__ == "__main__":
    main()
