"""End-of-speech (and barge-in) detection over a call's 16 kHz audio with silero-vad.

The silero-vad wheel ships its TorchScript weights (`silero_vad/data/silero_vad.jit`), so loading
needs no network. Its public wrapper keeps the recurrent state inside the module, which would make one
model serve one call; instead `SileroVad` calls the inner 16 kHz network as a pure function
`(64 context + 512 new samples, state) -> (speech prob, state)` and each call's
`VoiceActivityDetector` owns its state, so one loaded model serves every call of a gateway process.
That is exactly what the wrapper computes (tested sample for sample).

The detector is a small state machine over 32 ms windows, in the spirit of silero's VADIterator:
speech starts when `min_speech_ms` of windows reach `threshold`, it continues while windows stay above
`neg_threshold` (hysteresis), and it ends after `min_silence_ms` below it. `SpeechStarted` is also the
barge-in signal: keep feeding the caller's audio while the answer plays.

A window costs ~0.2 ms of CPU on ONE torch thread; with torch's default of one thread per core it
costs up to 100x more on a busy machine (thread pool wake-ups for a tiny LSTM), so every model call
runs with one thread, under a process-wide lock (the thread count is global), and the count is put
back after. Run `process` off the event loop (asyncio.to_thread) when calls are many.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import threading
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000
WINDOW = 512  # samples per model step at 16 kHz (32 ms): the only size the network takes
CONTEXT = 64  # samples of the previous window the network sees in front of each new one


class VadConfigError(ValueError):
    """A VAD setting out of range; the message names it and the allowed range."""


class VadInputError(ValueError):
    """Audio the VAD cannot take (not 1-D float, not finite)."""


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5  # speech probability that starts (and, above neg_threshold, keeps) speech
    min_speech_ms: int = 250  # shorter bursts (a cough, a click) never start an utterance
    min_silence_ms: int = 500  # silence that ends an utterance
    pre_roll_ms: int = 300  # audio kept before the detected onset (the model reacts a window late)
    post_roll_ms: int = 200  # audio kept after the last speech window (capped at min_silence_ms)
    max_utterance_s: float = 30.0  # an utterance is cut (reason "max_length") when it gets this long
    neg_threshold: float | None = None  # None: threshold - 0.15, as silero's VADIterator

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise VadConfigError(f"VAD threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise VadConfigError(
                f"VAD neg_threshold must be in [0, threshold={self.threshold}], got {self.neg_threshold}")
        for name, lo, hi in (("min_speech_ms", 0, 10_000), ("min_silence_ms", 32, 10_000),
                             ("pre_roll_ms", 0, 5_000), ("post_roll_ms", 0, 5_000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
                raise VadConfigError(f"VAD {name} must be a whole number of ms in [{lo}, {hi}], got {value!r}")
        if not 0.5 <= self.max_utterance_s <= 600:
            raise VadConfigError(f"VAD max_utterance_s must be in [0.5, 600], got {self.max_utterance_s}")

    @property
    def silence_threshold(self) -> float:
        return max(self.threshold - 0.15, 0.01) if self.neg_threshold is None else self.neg_threshold

    def with_options(self, threshold: float | None = None, min_silence_ms: int | None = None,
                     min_speech_ms: int | None = None) -> "VadConfig":
        """This config with the caller's overrides (the optional fields of VadOptions); None keeps ours."""
        changes = {k: v for k, v in (("threshold", threshold), ("min_silence_ms", min_silence_ms),
                                     ("min_speech_ms", min_speech_ms)) if v is not None}
        return replace(self, **changes)


@dataclass(frozen=True)
class SpeechStarted:
    t: float  # seconds since the stream began at which speech began (reported min_speech_ms later)


@dataclass(frozen=True, eq=False)
class SpeechEnded:
    t: float  # seconds since the stream began at which speech stopped (reported min_silence_ms later)
    audio: np.ndarray = field(repr=False)  # 16 kHz float32: pre-roll + utterance + post-roll
    start: float = 0.0  # the matching SpeechStarted.t
    reason: str = "silence"  # "silence", "max_length" (cut at max_utterance_s) or "flush" (stream ended)


VadEvent = SpeechStarted | SpeechEnded


class SileroVad:
    """The silero-vad 16 kHz network as a pure function of (audio window, state); thread-safe."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        self._net = scripted._model  # the 16 kHz branch of the wrapper; `_model_8k` is unused
        self._net.eval()

    @classmethod
    def load(cls) -> "SileroVad":
        """Weights from inside the installed silero-vad wheel (no download)."""
        threads = torch.get_num_threads()
        from silero_vad import load_silero_vad  # importing it sets torch's thread count to 1

        torch.set_num_threads(threads)
        return cls(load_silero_vad(onnx=False))

    @staticmethod
    def initial_state() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(2, 1, 128), torch.zeros(1, CONTEXT)

    @torch.inference_mode()
    def probs(self, audio: np.ndarray, state: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
        """Speech probability of each 512-sample window of audio (a multiple of 512 samples long)."""
        rnn, context = state
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).reshape(-1, WINDOW)
        out = np.empty(x.shape[0], dtype=np.float32)
        with _one_torch_thread():
            for i in range(x.shape[0]):
                window = torch.cat([context, x[i : i + 1]], dim=1)
                prob, rnn = self._net(window, rnn)
                context = window[:, -CONTEXT:]
                out[i] = float(prob)
        return out, (rnn, context)


@lru_cache(maxsize=1)
def shared_model() -> SileroVad:
    """One model per process: detectors keep their own state, so every call can share it."""
    return SileroVad.load()


_TORCH_THREADS_LOCK = threading.Lock()


@contextmanager
def _one_torch_thread():
    with _TORCH_THREADS_LOCK:
        before = torch.get_num_threads()
        if before != 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if before != 1:
                torch.set_num_threads(before)


_IDLE, _PENDING, _SPEECH = "idle", "pending", "speech"


class VoiceActivityDetector:
    """Per-call VAD state: feed 16 kHz audio in any chunk size, get SpeechStarted / SpeechEnded."""

    def __init__(self, config: VadConfig = VadConfig(), model: SileroVad | None = None):
        self.config = config
        self.model = model if model is not None else shared_model()
        ms = SAMPLE_RATE // 1000
        self._min_speech = config.min_speech_ms * ms
        self._min_silence = config.min_silence_ms * ms
        self._pre_roll = config.pre_roll_ms * ms
        self._post_roll = min(config.post_roll_ms, config.min_silence_ms) * ms
        self._max_len = int(config.max_utterance_s * SAMPLE_RATE)
        self.reset()

    def reset(self) -> None:
        """Forget everything: a fresh stream whose time starts at 0."""
        self._model_state = self.model.initial_state()
        self._tail = np.zeros(0, dtype=np.float32)  # < WINDOW samples not yet given to the model
        self._chunks: list[np.ndarray] = []  # audio from sample _buf_start up to _pos (a list: no
        # quadratic copying while a long utterance grows 20 ms at a time)
        self._buf_start = 0
        self._pos = 0  # samples given to the model so far
        self._floor = 0  # an utterance's audio never reaches back before the previous one's end
        self._state = _IDLE
        self._onset = self._last_speech_end = 0
        self._speech = self._silence = 0

    @property
    def in_speech(self) -> bool:
        """True between SpeechStarted and SpeechEnded."""
        return self._state == _SPEECH

    @property
    def time_s(self) -> float:
        return (self._pos + self._tail.size) / SAMPLE_RATE

    def process(self, samples: np.ndarray) -> list[VadEvent]:
        """Feed the next 16 kHz float samples; returns the events they complete, in order."""
        x = np.asarray(samples)
        if x.ndim != 1 or (x.size and not np.issubdtype(x.dtype, np.floating)):
            raise VadInputError(f"VAD input must be 1-D float samples at 16 kHz, got {x.dtype} {x.shape}")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise VadInputError("VAD input contains NaN or infinite samples")
        audio = np.concatenate([self._tail, x])
        n = audio.size // WINDOW * WINDOW
        self._tail = audio[n:].copy()
        if n == 0:
            return []
        probs, self._model_state = self.model.probs(audio[:n], self._model_state)
        self._chunks.append(audio[:n])
        events: list[VadEvent] = []
        for p in probs:
            self._pos += WINDOW
            events.extend(self._step(float(p)))
        if self._state == _IDLE:
            self._trim()
        return events

    def flush(self) -> list[VadEvent]:
        """The stream ended: close an utterance in progress (reason "flush"). The detector stays usable."""
        events: list[VadEvent] = []
        if self._state == _SPEECH:  # the < 32 ms not yet seen by the model is left out
            events.append(self._end(min(self._last_speech_end + self._post_roll, self._pos), "flush"))
        elif self._state == _PENDING:
            self._state = _IDLE
        return events

    # ---- the state machine, one 32 ms window at a time ----

    def _step(self, p: float) -> list[VadEvent]:
        cfg, end = self.config, self._pos
        voiced = p >= cfg.silence_threshold
        if self._state == _IDLE:
            if p < cfg.threshold:
                return []
            self._state, self._onset = _PENDING, end - WINDOW
            self._speech, self._silence, self._last_speech_end = 0, 0, end
        if voiced:
            self._silence, self._last_speech_end = 0, end
        else:
            self._silence += WINDOW
        if self._state == _PENDING:
            self._speech += WINDOW if voiced else 0
            if self._speech >= max(self._min_speech, WINDOW):
                self._state = _SPEECH
                return [SpeechStarted(self._onset / SAMPLE_RATE)]
            if self._silence >= self._min_silence:
                self._state = _IDLE  # a burst too short to be speech
            return []
        if self._silence >= self._min_silence:
            return [self._end(self._last_speech_end + self._post_roll, "silence")]
        if end - self._onset >= self._max_len:
            return [self._end(end, "max_length")]
        return []

    def _end(self, audio_end: int, reason: str) -> SpeechEnded:
        start = max(self._onset - self._pre_roll, self._floor, self._buf_start)
        audio = self._buffer()[start - self._buf_start : audio_end - self._buf_start].copy()
        t_end = self._last_speech_end if reason != "max_length" else audio_end
        self._state, self._floor = _IDLE, audio_end
        return SpeechEnded(t_end / SAMPLE_RATE, audio, start=self._onset / SAMPLE_RATE, reason=reason)

    def _trim(self) -> None:
        """While idle, keep only what a future utterance's pre-roll could need."""
        keep_from = max(self._pos - self._pre_roll, self._floor, self._buf_start)
        if keep_from > self._buf_start:
            self._chunks = [self._buffer()[keep_from - self._buf_start :].copy()]
            self._buf_start = keep_from

    def _buffer(self) -> np.ndarray:
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)]
        return self._chunks[0]
