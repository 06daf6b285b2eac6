"""Audio facts of GLM-4-Voice's tokenizer and decoder, which VITA-Audio uses as they are: defined once.

Plain constants (no torch), so torch-free modules (lmtext, the gateway) can import them.
"""

from __future__ import annotations

TOKENIZER_RATE = 16000  # Hz of the speech the WhisperVQ tokenizer takes in
DECODER_RATE = 22050  # Hz of the speech the flow + HiFT decoder gives out
HOP = 256  # HiFT hop (samples per mel frame), hard-coded in the official flow / flow_inference
AUDIO_CODEBOOK_SIZE = 16384  # audio token ids are 0..16383
TOKENS_PER_SECOND = 12.5  # audio tokens per second of speech

# Decoder block sizes in audio tokens, the last one repeating.
GLM4VOICE_BLOCKS = (25, 50, 100, 150, 200)  # GLM-4-Voice web_demo.py `block_size_list`
VITA_FIRST_BLOCK = 10  # the burst of the 10 MCTP modules after VITA-Audio's first backbone forward
VITA_BLOCKS = (VITA_FIRST_BLOCK,) + GLM4VOICE_BLOCKS
