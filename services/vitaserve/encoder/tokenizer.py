"""`SpeechTokenizer`: waveforms -> GLM-4-Voice audio token ids (12.5 per second, ids < 16384).

Matches the official `extract_speech_token` (GLM-4-Voice speech_tokenizer/utils.py) applied to each
utterance on its own: first channel only, 30 s windows, each window zero-padded to a multiple of
1280 samples, the windows of one utterance padded together to the longest (which is how the
official code batches them, and it changes the log-mel of the last frames), a token kept when its
first mel frame holds audio. Utterances are then batched across calls on the *features*, with
padding masks; causal convolutions and masked, block-causal attention make that padding invisible,
so `encode([a, b]) == encode([a]) + encode([b])`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.encoder.checkpoint import load_encoder
from vitaserve.encoder.model import WhisperVQEncoder

WINDOW_SECONDS = 30  # the official code cuts at 30 * 16000 samples


@dataclass(frozen=True)
class MelConfig:
    """The Whisper front end, from preprocessor_config.json."""

    sampling_rate: int
    n_fft: int
    hop_length: int
    feature_size: int
    mel_filters: torch.Tensor  # (n_fft // 2 + 1, feature_size), float32, transformers' slaney filters

    @classmethod
    def from_folder(cls, folder: Path) -> "MelConfig":
        from transformers import WhisperFeatureExtractor

        if not (folder / "preprocessor_config.json").is_file():
            raise CheckpointError(f"{folder}: no preprocessor_config.json")
        fe = WhisperFeatureExtractor.from_pretrained(str(folder))
        return cls(
            sampling_rate=fe.sampling_rate,
            n_fft=fe.n_fft,
            hop_length=fe.hop_length,
            feature_size=fe.feature_size,
            mel_filters=torch.from_numpy(fe.mel_filters).float(),
        )


@dataclass
class _Window:
    utterance: int
    features: torch.Tensor  # (n_mels, frames), frames a multiple of frames_per_token
    valid_frames: int


class SpeechTokenizer:
    def __init__(self, model: WhisperVQEncoder, mel: MelConfig, max_batch_frames: int = 24000):
        if mel.feature_size != model.config.num_mel_bins:
            raise CheckpointError(
                f"preprocessor_config.json has {mel.feature_size} mel bins, config.json {model.config.num_mel_bins}"
            )
        self.model = model
        self.mel = mel
        self.device = model.codebook.weight.device
        self.dtype = model.codebook.weight.dtype
        self.max_batch_frames = max_batch_frames  # mel frames per forward: 8 windows of 30 s
        self.frames_per_token = model.config.frames_per_token
        self.samples_per_token = self.frames_per_token * mel.hop_length  # 1280
        self._window = torch.hann_window(mel.n_fft, device=self.device)
        self._filters = mel.mel_filters.to(self.device)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "SpeechTokenizer":
        folder = Path(folder)
        model = load_encoder(folder, device=device, dtype=dtype)
        return cls(model, MelConfig.from_folder(folder))

    @property
    def sample_rate(self) -> int:
        return self.mel.sampling_rate

    @property
    def tokens_per_second(self) -> float:
        return self.sample_rate / self.samples_per_token

    @property
    def vocab_size(self) -> int:
        return self.model.config.quantize_vocab_size

    # ---- input checks and resampling ----
    def _prepare(self, index: int, waveform, sample_rate: float) -> np.ndarray:
        """One utterance as float32 mono at the model rate.

        Rates other than 16 kHz go through soxr (high quality). The official code uses torchaudio's
        default sinc resampler instead, so resampled input (8 kHz phone audio in particular) may
        differ from the official tokens in a few places; 16 kHz input is not resampled at all.
        """
        name = f"waveform {index}"
        if not isinstance(waveform, np.ndarray):
            raise ValueError(f"{name} is a {type(waveform).__name__}; expected a numpy array")
        if not np.issubdtype(waveform.dtype, np.floating):
            raise ValueError(
                f"{name} has dtype {waveform.dtype}; expected float samples in [-1, 1] (int16 PCM: divide by 32768)"
            )
        if waveform.ndim == 2:
            # (channels, samples) as torchaudio loads it; the official code keeps channel 0
            if waveform.shape[0] > waveform.shape[1]:
                raise ValueError(
                    f"{name} has shape {waveform.shape}; 2-D input must be (channels, samples): transpose it"
                )
            waveform = waveform[0]
        elif waveform.ndim != 1:
            raise ValueError(f"{name} has shape {waveform.shape}; expected (samples,) or (channels, samples)")
        if waveform.size == 0:
            raise ValueError(f"{name} is empty")
        if not np.isfinite(waveform).all():
            raise ValueError(f"{name} contains NaN or infinite samples")
        audio = np.ascontiguousarray(waveform, dtype=np.float32)
        if sample_rate != self.sample_rate:
            import soxr

            audio = soxr.resample(audio, sample_rate, self.sample_rate).astype(np.float32, copy=False)
            if audio.size == 0:
                raise ValueError(f"{name} is shorter than one sample at {self.sample_rate} Hz")
        return audio

    # ---- front end ----
    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Whisper log-mel of one padded window (samples,) -> (n_mels, samples // hop).

        The torch path of transformers' WhisperFeatureExtractor: centred STFT with reflect padding,
        last frame dropped, log10 floor 1e-10, clamp to max - 8, then (x + 4) / 4.
        """
        stft = torch.stft(audio, self.mel.n_fft, self.mel.hop_length, window=self._window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self._filters.T @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0

    def _windows(self, index: int, audio: np.ndarray) -> list[_Window]:
        window = WINDOW_SECONDS * self.sample_rate
        segments = [audio[start : start + window] for start in range(0, audio.shape[0], window)]
        step = self.samples_per_token
        own = [math.ceil(len(s) / step) * step for s in segments]
        longest = max(own)
        out = []
        for segment, padded in zip(segments, own):
            # The official batch pads this window with zeros up to `longest` before the STFT. Frames
            # inside `padded` only read up to n_fft/2 samples past it, and the log-mel maximum can only
            # come from frames that touch audio, so one extra token of zeros reproduces it exactly.
            length = min(longest, padded + step)
            buffer = torch.zeros(length, dtype=torch.float32)
            buffer[: len(segment)] = torch.from_numpy(segment)
            features = self.log_mel(buffer.to(self.device))
            valid = math.ceil(len(segment) / self.mel.hop_length)
            out.append(_Window(index, features, valid))
        return out

    # ---- the public call ----
    @torch.inference_mode()
    def encode(self, waveforms: list[np.ndarray], sample_rate: int) -> list[list[int]]:
        """Token ids for each utterance, computed in as few batched forwards as the frame budget allows.

        waveforms: float arrays, (samples,) or (channels, samples) (channel 0 is used), any length.
        sample_rate: Hz of all of them; 16 kHz is native, other rates are resampled with soxr where
        the official code uses torchaudio's default sinc resampler, so a few tokens of resampled
        (e.g. 8 kHz) input may differ from the official ones.
        """
        if isinstance(waveforms, np.ndarray) or not isinstance(waveforms, (list, tuple)):
            raise ValueError("waveforms must be a list of numpy arrays, one per utterance")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
            raise ValueError(f"sample_rate must be a number of Hz, got {sample_rate!r}")
        if not (math.isfinite(sample_rate) and sample_rate > 0):
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        audios = [self._prepare(i, w, sample_rate) for i, w in enumerate(waveforms)]
        windows = [w for i, audio in enumerate(audios) for w in self._windows(i, audio)]
        # longest first, so each batch pads little; the result does not depend on the grouping
        order = sorted(range(len(windows)), key=lambda i: -windows[i].features.shape[1])
        ids_per_window: list[list[int]] = [[] for _ in windows]
        start = 0
        while start < len(order):
            frames = windows[order[start]].features.shape[1]
            count = max(1, self.max_batch_frames // frames)
            batch = order[start : start + count]
            for i, ids in zip(batch, self._forward([windows[i] for i in batch])):
                ids_per_window[i] = ids
            start += count
        tokens: list[list[int]] = [[] for _ in audios]
        for window, ids in zip(windows, ids_per_window):
            tokens[window.utterance].extend(ids)
        return tokens

    def _forward(self, windows: list[_Window]) -> list[list[int]]:
        frames = max(w.features.shape[1] for w in windows)
        features = torch.zeros(len(windows), self.mel.feature_size, frames, device=self.device, dtype=self.dtype)
        mask = torch.zeros(len(windows), frames, dtype=torch.bool, device=self.device)
        for row, window in enumerate(windows):
            features[row, :, : window.features.shape[1]] = window.features
            mask[row, : window.valid_frames] = True
        ids, token_mask = self.model(features, mask)
        return [row_ids[row_mask].tolist() for row_ids, row_mask in zip(ids.cpu(), token_mask.cpu())]
