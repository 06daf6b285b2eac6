"""Text tokenizer files: load the released tokenizer.json, or build a small one for tiny checkpoints.

A built tokenizer is a byte-level BPE in the Qwen2 style (NFC, Qwen2's pre-split pattern, byte-level
alphabet), trained on a short built-in text, padded with unreachable filler entries up to
`base_size`, then given the Qwen2.5 special tokens, the VITA-Audio special tokens and the 16384
<|audio_N|> tokens in the official order, so every id sits where the released layout puts it
relative to <|endoftext|>.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vitaserve.lmtext.vocab import AUDIO_CODEBOOK_SIZE, QWEN_SPECIAL_TOKENS, VITA_SPECIAL_TOKENS, audio_token

# Qwen2's pre-tokenizer split pattern (a fact of the released tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
Hello, how are you today? I am fine, thank you. What can I do for you?
Convert the speech to text. Convert the text to speech. Your Name: Luke. Your Gender: male.
Respond in a text-audio interleaved manner. The weather is sunny and warm this afternoon.
Please call me back at the number on your screen. Your order will arrive on Tuesday morning.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2025.
Voice assistants answer questions, set timers, play music, and read the news aloud.
你好，今天天气怎么样？我很好，谢谢。请问有什么可以帮您？
"""


def build_text_tokenizer(base_size: int, trained_size: int = 512) -> Tokenizer:
    """A tokenizer whose special and audio ids start at `base_size` (151643 in the released one)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(trained_size, base_size), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) > base_size:
        raise ValueError(f"base_size {base_size} is smaller than the byte alphabet")
    for i in range(len(vocab), base_size):  # unreachable fillers: no merge produces them
        vocab[f"<filler_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VITA_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(audio_token(i), special=False, normalized=False) for i in range(AUDIO_CODEBOOK_SIZE)])
    return tok


def write_tokenizer_files(tok: Tokenizer, folder: Path, model_max_length: int = 32768) -> None:
    """tokenizer.json plus a tokenizer_config.json with the keys the released one has."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "add_prefix_space": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_text_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: text prompts and detokenisation need the tokenizer files")
    return Tokenizer.from_file(str(path))
