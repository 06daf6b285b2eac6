"""Prompt building against golden strings derived from the official ChatML template, and text streaming."""

from __future__ import annotations

import pytest

from vitaserve.lmtext.detokenize import TextStream
from vitaserve.lmtext.prompt import PromptBuilder, Turn
from vitaserve.lmtext.text_tokenizer import load_text_tokenizer
from vitaserve.lmtext.vocab import AudioVocab


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    return load_text_tokenizer(tiny_lm_dir)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


# What the official template (Qwen2 ChatML, no default system, add_generation_prompt=True) renders.
GOLDEN_SQA = (
    "<|im_start|>system\nYour Name: Luke\nYour Gender: male\n\nRespond in a text-audio interleaved manner.<|im_end|>\n"
    "<|im_start|>user\n\n<|begin_of_audio|><|audio_7|><|audio_16383|><|audio_0|><|end_of_audio|><|im_end|>\n"
    "<|im_start|>assistant\n"
)
GOLDEN_ASR = (
    "<|im_start|>user\nConvert the speech to text.\n<|begin_of_audio|><|audio_1|><|audio_2|><|end_of_audio|><|im_end|>\n"
    "<|im_start|>assistant\n"
)
GOLDEN_TTS = "<|im_start|>user\nConvert the text to speech.\nHello there, how are you?<|im_end|>\n<|im_start|>assistant\n"


def test_spoken_qa_prompt_matches_official_template(tok):
    assert PromptBuilder(tok).spoken_qa([7, 16383, 0]) == enc(tok, GOLDEN_SQA)


def test_asr_and_tts_prompts_match_official_template(tok):
    pb = PromptBuilder(tok)
    assert pb.asr([1, 2]) == enc(tok, GOLDEN_ASR)
    assert pb.tts("Hello there, how are you?") == enc(tok, GOLDEN_TTS)


def test_multi_turn_keeps_earlier_turns_ids(tok):
    pb = PromptBuilder(tok)
    vocab = AudioVocab.from_tokenizer(tok)
    answer = enc(tok, "Hi!") + [vocab.audio_id(5), vocab.audio_id(6), vocab.im_end_id]
    ids = pb.spoken_qa([9], history=[Turn([3, 4], answer)])
    golden = (
        "<|im_start|>system\nYour Name: Luke\nYour Gender: male\n\nRespond in a text-audio interleaved manner.<|im_end|>\n"
        "<|im_start|>user\n\n<|begin_of_audio|><|audio_3|><|audio_4|><|end_of_audio|><|im_end|>\n"
        "<|im_start|>assistant\nHi!<|audio_5|><|audio_6|><|im_end|>\n"
        "<|im_start|>user\n\n<|begin_of_audio|><|audio_9|><|end_of_audio|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids == enc(tok, golden)


def test_special_and_audio_ids_are_single_tokens_in_official_layout(tok):
    vocab = AudioVocab.from_tokenizer(tok)  # raises if any anchor is off
    assert enc(tok, "<|audio_0|><|audio_16383|>") == [vocab.audio_offset, vocab.audio_offset + 16383]
    assert vocab.begin_of_audio_id == vocab.endoftext_id + 22 + 9


def test_bad_prompt_inputs(tok):
    pb = PromptBuilder(tok)
    with pytest.raises(ValueError, match="outside"):
        pb.asr([16384])
    with pytest.raises(ValueError, match="empty"):
        pb.tts("   ")


def test_text_stream_never_breaks_utf8(tok):
    vocab = AudioVocab.from_tokenizer(tok)
    text = "Héllo 你好, wörld! 🎉 ok"
    ids = enc(tok, text)
    # interleave audio ids as the model does; they must not appear in the text
    mixed = []
    for i, t in enumerate(ids):
        mixed.append(t)
        if i % 3 == 0:
            mixed.append(vocab.audio_id(i))
    stream = TextStream(tok, vocab.endoftext_id)
    deltas = [stream.push(t) for t in mixed] + [stream.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
