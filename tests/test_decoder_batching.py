"""Cross-stream batching of the decoder: a block decoded in a batch equals the same block alone.

The service batches the same block of concurrent streams (equal shapes, `AudioDecoder.batch_key`).
Each stream keeps its own generator, so its noise, and therefore its audio, cannot depend on which
other streams shared the forward; only GEMM blocking differs, hence the float tolerance (for the
sine source and the PCM it drives, one that grows with the block length: `source_snr_db`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitaserve.decoder.audio_decoder import AudioDecoder, Block
from vitaserve.decoder.checkpoint import write_decoder_checkpoint
from vitaserve.decoder.rng import draw

from audio_checks import AUDIO_SNR_DB, MEL_SNR_DB, source_snr_db
from audio_checks import assert_close_snr as _close

PLAN = [10, 25, 14]  # the gateway's "vita" plan opens with 10 tokens; 14 ends the streams
STEPS = 2

@pytest.fixture(scope="module")
def dec(tmp_path_factory):
    return AudioDecoder.from_pretrained(write_decoder_checkpoint(tmp_path_factory.mktemp("decoder"), "tiny", seed=0))


def _tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 16384, n).tolist()


def test_draw_per_row_equals_each_generator_alone():
    rows = draw("normal", (3, 2, 5), [torch.Generator().manual_seed(s) for s in (1, 2, 3)], "cpu")
    for i, s in enumerate((1, 2, 3)):
        assert torch.equal(rows[i : i + 1], torch.randn((1, 2, 5), generator=torch.Generator().manual_seed(s)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        draw("uniform", (3, 1), [None, None], "cpu")


def test_flow_batch_equals_each_sequence_alone(dec):
    flow = dec.flow
    n_tok, n_prompt = 10, 12
    feat_frames = flow.mel_frames(n_prompt) - 3
    seeds = (42, 42, 7)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 16384, (3, n_tok), generator=g)
    prompt = torch.randint(0, 16384, (3, n_prompt), generator=g)
    feat = torch.randn(3, feat_frames, 80, generator=g)
    emb = torch.randn(3, 192, generator=g)
    for deterministic in (False, True):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        batch = flow.inference(tok, torch.tensor([n_tok] * 3), prompt, n_prompt, feat, feat_frames, emb, STEPS,
                               generator=gens, deterministic=deterministic)
        for i, s in enumerate(seeds):
            alone = flow.inference(tok[i : i + 1], n_tok, prompt[i : i + 1], n_prompt, feat[i : i + 1], feat_frames,
                                   emb[i : i + 1], STEPS, generator=torch.Generator().manual_seed(s),
                                   deterministic=deterministic)
            _close(batch[i : i + 1], alone, f"flow row {i} deterministic={deterministic}", MEL_SNR_DB)
    assert not torch.allclose(batch[0], batch[1])  # different tokens give different mels
    with pytest.raises(ValueError, match="same batch size"):
        flow.inference(tok, n_tok, prompt[:2], n_prompt, feat, feat_frames, emb, STEPS)
    with pytest.raises(ValueError, match="token_len must equal"):
        flow.inference(tok, torch.tensor([n_tok, n_tok, n_tok - 1]), prompt, n_prompt, feat, feat_frames, emb, STEPS)


def test_hift_batch_with_per_row_generators_equals_each_mel_alone(dec):
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(3, 80, 20, generator=g)
    cache = torch.randn(3, 1, 256, generator=g) * 0.1
    seeds = (42, 5, 42)
    speech, source = dec.hift.inference(mel, cache, generator=[torch.Generator().manual_seed(s) for s in seeds])
    for i, s in enumerate(seeds):
        one_gen = torch.Generator().manual_seed(s)
        alone, alone_source = dec.hift.inference(mel[i : i + 1], cache[i : i + 1], generator=one_gen)
        _close(speech[i : i + 1], alone, f"speech row {i}", AUDIO_SNR_DB)
        _close(source[i : i + 1], alone_source, f"source row {i}", AUDIO_SNR_DB)


def _streams(seeding: str, deterministic: bool, n: int = 3):
    return [dict(tokens=_tokens(100 + i, sum(PLAN)), seed=42 + (i if seeding == "per_stream" else 0))
            for i in range(n)], dict(seeding=seeding, deterministic=deterministic)


@pytest.mark.parametrize("seeding,deterministic", [("per_block", False), ("per_stream", False), ("per_block", True)])
def test_streams_decoded_block_by_block_in_batches_equal_each_stream_alone(dec, seeding, deterministic):
    specs, opts = _streams(seeding, deterministic)
    alone_states = [dec.start_stream(seed=s["seed"], **opts) for s in specs]
    batch_states = [st.copy() for st in alone_states]
    offset = 0
    for k, size in enumerate(PLAN):
        final = k == len(PLAN) - 1
        blocks = [Block(st, tuple(s["tokens"][offset : offset + size]), final, STEPS)
                  for st, s in zip(batch_states, specs)]
        assert len({dec.batch_key(b) for b in blocks}) == 1  # same block of equally cut streams: one batch
        batched = dec.decode_chunks(blocks)
        for i, (pcm, state) in enumerate(batched):
            ref_pcm, ref_state = dec.decode_chunk(alone_states[i], blocks[i].tokens, final, STEPS)
            vocoded = state.prompt_mel.shape[1] - blocks[i].state.prompt_mel.shape[1]  # frames through HiFT
            source_snr = source_snr_db(vocoded)
            _close(pcm, ref_pcm, f"block {k} stream {i} pcm", source_snr)
            for name in ("prompt_mel", "mel_overlap", "hift_cache_mel", "hift_cache_source"):
                snr = source_snr if name == "hift_cache_source" else MEL_SNR_DB
                _close(getattr(state, name), getattr(ref_state, name), f"block {k} stream {i} {name}", snr)
            assert torch.equal(state.prompt_tokens, ref_state.prompt_tokens)
            assert torch.equal(state.rng_state, ref_state.rng_state)  # each generator advanced as if alone
            assert (state.blocks_done, state.samples_out, state.finalized) == (
                ref_state.blocks_done, ref_state.samples_out, ref_state.finalized)
            alone_states[i] = ref_state
        batch_states = [state for _, state in batched]
        offset += size
    assert all(st.finalized for st in batch_states)


def test_empty_final_blocks_batch_too(dec):
    states = [dec.decode_chunk(dec.start_stream(), _tokens(i, 10), ode_steps=STEPS)[1] for i in range(2)]
    blocks = [Block(st, (), True, STEPS) for st in states]
    for (pcm, state), block in zip(dec.decode_chunks(blocks), blocks):
        ref, _ = dec.decode_chunk(block.state, (), True, STEPS)
        _close(pcm, ref, "final flush", AUDIO_SNR_DB)
        assert pcm.size > 0 and state.finalized


def test_unequal_or_redecode_blocks_are_refused_together_and_keys_say_so(dec):
    fresh = dec.start_stream()
    ten, twelve = Block(fresh, tuple(_tokens(1, 10))), Block(fresh, tuple(_tokens(2, 12)))
    assert dec.batch_key(ten) != dec.batch_key(twelve)
    assert dec.batch_key(Block(fresh, ten.tokens, ode_steps=3)) != dec.batch_key(ten)
    with pytest.raises(ValueError, match="equal shapes"):
        dec.decode_chunks([ten, twelve])
    redecode = Block(dec.start_stream(mode="vita_redecode"), ten.tokens)
    assert dec.batch_key(redecode) is None
    with pytest.raises(ValueError, match="equal shapes"):
        dec.decode_chunks([redecode, redecode])
    pcm, _ = dec.decode_chunks([redecode])[0]  # alone it decodes
    assert pcm.size > 0
    with pytest.raises(ValueError, match=r"\[0, 16384\)"):
        dec.decode_chunks([ten, Block(fresh, (16384,) * 10)])
    assert dec.decode_chunks([]) == []
