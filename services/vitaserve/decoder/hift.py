"""HiFT vocoder of the GLM-4-Voice decoder: 80-bin mel (22050 Hz, hop 256) -> waveform.

HiFTNet = neural source filter + iSTFTNet (CosyVoice `HiFTGenerator`): an F0 predictor turns the mel
into a pitch track, a sine source (9 harmonics + noise) is built from it, its STFT is fused into an
upsampling conv stack with Snake resblocks, and the last conv predicts a 16-point iSTFT (hop 4).
State-dict keys are those of the released hift.pt (old-style weight norm: `weight_g` / `weight_v`).

Randomness (SineGen phases, SineGen noise, the unused source-noise draw) comes from an explicit
`torch.Generator` in the official order, or is zero with `deterministic=True`. A batch of mels from
different streams passes one generator per row: each row then draws exactly what it would alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitaserve.common.audio_facts import DECODER_RATE
from vitaserve.common.checkpoint_errors import CheckpointError
from vitaserve.common.state_dict import load_strict
from vitaserve.common.weight_files import read_torch_state
from vitaserve.decoder.rng import Generators, draw, per_row


@dataclass(frozen=True)
class HiftConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = DECODER_RATE
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std in voiced regions
    nsf_voiced_threshold: float = 10.0  # Hz
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    n_fft: int = 16  # istft_params.n_fft
    hop_len: int = 4  # istft_params.hop_len
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_in_channels: int = 80
    f0_cond_channels: int = 512

    @property
    def samples_per_frame(self) -> int:
        """256 released: each mel frame becomes this many samples."""
        return math.prod(self.upsample_rates) * self.hop_len

    @classmethod
    def from_yaml_dict(cls, d: dict) -> "HiftConfig":
        """Build from config.yaml's `hift` mapping (HyperPyYAML `!new:` dict, '_class' keys ignored)."""
        cls_name = d.get("_class", "")
        if cls_name and not cls_name.endswith("HiFTGenerator"):
            raise CheckpointError(f"config.yaml hift is {cls_name!r}; only HiFTGenerator is supported")
        flat = {k: v for k, v in d.items() if k not in ("_class", "istft_params", "f0_predictor")}
        if "istft_params" in d:
            flat["n_fft"] = d["istft_params"]["n_fft"]
            flat["hop_len"] = d["istft_params"]["hop_len"]
        f0 = d.get("f0_predictor") or {}
        f0_cls = f0.get("_class", "")
        if f0_cls and not f0_cls.endswith("ConvRNNF0Predictor"):
            raise CheckpointError(f"config.yaml hift.f0_predictor is {f0_cls!r}; only ConvRNNF0Predictor is supported")
        for key in ("num_class", "in_channels", "cond_channels"):
            if key in f0:
                flat[f"f0_{key}"] = f0[key]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise CheckpointError(f"config.yaml hift has unknown keys: {', '.join(unknown)}")
        tuples = {k: tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in v)
                  for k, v in flat.items() if isinstance(v, (list, tuple))}
        return cls(**{**flat, **tuples})


class WNConv1d(nn.Module):
    """Conv1d / ConvTranspose1d under old-style weight norm (dim 0), keys weight_g, weight_v, bias.

    The effective weight g * v / |v| is folded once by `fold()` (eval only), which is what the
    official pre-forward hook recomputes on every call: same op, same values.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, transposed: bool = False):
        super().__init__()
        shape = (cin, cout, kernel) if transposed else (cout, cin, kernel)
        self.weight_v = nn.Parameter(torch.randn(shape) * 0.01)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(self.weight_v.detach(), dim=(1, 2), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.stride, self.padding, self.dilation, self.transposed = stride, padding, dilation, transposed
        self._folded: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        if self._folded is not None:
            return self._folded
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def fold(self) -> None:
        with torch.no_grad():
            self._folded = torch._weight_norm(self.weight_v, self.weight_g, 0).detach()

    def _load_from_state_dict(self, *args, **kwargs):
        self._folded = None  # new weights: the folded copy is stale
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding)
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class Snake(nn.Module):
    """x + 1/alpha * sin^2(alpha x), alpha per channel, linear scale (key `alpha`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Per dilation: Snake, dilated conv, Snake, conv, residual add."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel, padding=(kernel * d - d) // 2, dilation=d) for d in dilations)
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    """Five 3-tap convs with ELU, then a linear head; |output| is F0 in Hz per mel frame."""

    def __init__(self, num_class: int, in_channels: int, cond_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):  # Sequential indices 0, 2, 4, 6, 8 are the convs (state-dict keys)
            layers += [WNConv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))  # [B, T]


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise source: sines at F0 * (1..H+1), merged by a linear layer and tanh."""

    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.harmonics = cfg.nb_harmonics + 1
        self.sampling_rate = cfg.sampling_rate
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def sine_waves(self, f0: torch.Tensor, generator: Generators, deterministic: bool,
                   phase_generator: Generators = None) -> torch.Tensor:
        """SineGen on f0 [B, 1, L] Hz (float32) -> [B, H+1, L]; draws phases, then noise.

        The official phases come from a Uniform(-pi, pi) built on the CPU, so they are a CPU draw
        even when the model runs on CUDA: pass `phase_generator` (CPU) there (one per row with
        per-row generators).
        """
        B = f0.shape[0]
        mult = torch.arange(1, self.harmonics + 1, dtype=torch.float32, device=f0.device)[None, :, None]
        rad = f0 * mult / self.sampling_rate  # cycles per sample, per harmonic
        theta = 2 * np.pi * (torch.cumsum(rad, dim=-1) % 1)
        if deterministic:
            phase = torch.zeros(B, self.harmonics, 1, device=f0.device)
        else:
            gen = phase_generator if phase_generator is not None else generator
            gens = gen if per_row(gen) else [gen]
            if any(g is not None and g.device.type != "cpu" for g in gens):
                raise ValueError("SineGen phases are a CPU draw: pass a CPU phase_generator with a CUDA generator")
            low, high = torch.tensor(-np.pi, dtype=torch.float32), torch.tensor(np.pi, dtype=torch.float32)
            u = draw("uniform", (B, self.harmonics, 1), gen, "cpu")
            phase = (low + u * (high - low)).to(f0.device)
            phase[:, 0, :] = 0  # the fundamental always starts at phase 0
        sines = self.sine_amp * torch.sin(theta + phase)
        uv = (f0 > self.voiced_threshold).to(torch.float32)
        if deterministic:
            return sines * uv
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * draw("normal", sines.shape, generator, f0.device, sines.dtype, none_device=f0.device)
        return sines * uv + noise

    def forward(self, f0: torch.Tensor, generator: Generators = None, deterministic: bool = False,
                phase_generator: Generators = None) -> torch.Tensor:
        """f0 [B, 1, L] Hz -> excitation [B, 1, L] (float32)."""
        sines = self.sine_waves(f0, generator, deterministic, phase_generator)
        w = self.l_linear.weight
        merged = torch.tanh(self.l_linear(sines.transpose(1, 2).to(w.dtype))).to(torch.float32)
        if not deterministic:
            # the official module also draws a noise branch that HiFT never uses; keep the draw so
            # the generator advances exactly as the official global RNG does
            draw("normal", (f0.shape[0], f0.shape[-1], 1), generator, f0.device, none_device=f0.device)
        return merged.transpose(1, 2)


def hann_window(n: int) -> torch.Tensor:
    """Periodic Hann window as scipy's get_window('hann', n) computes it (float64, then float32)."""
    fac = np.linspace(-np.pi, np.pi, n + 1)[:-1]
    return torch.from_numpy((0.5 + 0.5 * np.cos(fac)).astype(np.float32))


class HiFTGenerator(nn.Module):
    """mel [B, 80, T] -> speech [B, T * 256], clamped to +-audio_limit."""

    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        n_up = len(cfg.upsample_rates)
        self.m_source = SourceModuleHnNSF(cfg)
        self.conv_pre = WNConv1d(cfg.in_channels, ch, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConv1d(ch // 2**i, ch // 2 ** (i + 1), k, stride=u, padding=(k - u) // 2, transposed=True)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        # the source STFT (n_fft + 2 channels, one frame per hop_len samples) is brought down to each
        # stage's rate: stride = product of the upsample rates still to come
        stft_ch = cfg.n_fft + 2
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            c = ch // 2 ** (i + 1)
            stride = math.prod(cfg.upsample_rates[i + 1:])
            if stride == 1:
                self.source_downs.append(nn.Conv1d(stft_ch, c, 1))
            else:
                self.source_downs.append(nn.Conv1d(stft_ch, c, stride * 2, stride, padding=stride // 2))
            self.source_resblocks.append(ResBlock(c, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(ch // 2 ** (i + 1), k, d)
            for i in range(n_up)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = WNConv1d(ch // 2**n_up, stft_ch, 7, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_num_class, cfg.f0_in_channels, cfg.f0_cond_channels)
        self.register_buffer("stft_window", hann_window(cfg.n_fft), persistent=False)

    def fold_weight_norm(self) -> None:
        """Compute every weight-normed weight once (call after loading, in eval)."""
        for m in self.modules():
            if isinstance(m, WNConv1d):
                m.fold()

    def _stft(self, s: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(s, self.cfg.n_fft, self.cfg.hop_len, self.cfg.n_fft, window=self.stft_window,
                          return_complex=True)
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)  # [B, n_fft + 2, L / hop + 1]

    def _istft(self, x: torch.Tensor) -> torch.Tensor:
        half = self.cfg.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :half]), max=1e2)
        phase = torch.sin(x[:, half:])  # the official model predicts sin(phase)'s argument
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.cfg.n_fft, self.cfg.hop_len, self.cfg.n_fft, window=self.stft_window)

    def forward(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None,
                generator: Generators = None, deterministic: bool = False,
                phase_generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 80, T] -> (speech [B, 256 T] float32, source [B, 1, 256 T] float32).

        cache_source [B, 1, n] (the last source samples of the previous chunk) overwrites the first
        n source samples so that the sine phases continue across chunks without a glitch.
        """
        cfg = self.cfg
        f0 = self.f0_predictor(mel.to(self.f0_predictor.classifier.weight.dtype)).to(torch.float32)  # [B, T]
        f0 = f0.repeat_interleave(cfg.samples_per_frame, dim=1)[:, None]  # nearest upsampling
        s = self.m_source(f0, generator, deterministic, phase_generator)
        if cache_source is not None and cache_source.shape[2] != 0:
            s[:, :, : cache_source.shape[2]] = cache_source
        s_stft = self._stft(s.squeeze(1)).to(mel.dtype)

        x = self.conv_pre(mel)
        n_k = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one more frame: the STFT has L / hop + 1
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * n_k](x)
            for j in range(1, n_k):
                xs += self.resblocks[i * n_k + j](x)
            x = xs / n_k
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as released
        speech = self._istft(x.to(torch.float32))
        return torch.clamp(speech, -cfg.audio_limit, cfg.audio_limit), s

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None,
                  generator: Generators = None, deterministic: bool = False,
                  phase_generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(mel, cache_source, generator, deterministic, phase_generator)


def load_hift(path: str | Path, cfg: HiftConfig, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> HiFTGenerator:
    """hift.pt (a plain state dict) -> HiFTGenerator in eval mode with weight norm folded."""
    path = Path(path)
    state = read_torch_state(path)
    model = HiFTGenerator(cfg)
    load_strict(model, state, str(path), "config.yaml")
    # pitch and source stay float32: a bf16 F0 drifts the sine phases (cumsum over the whole chunk)
    model = model.to(device=device).eval()
    for name, child in model.named_children():
        if name not in ("f0_predictor", "m_source"):
            child.to(dtype)
    model.stft_window = hann_window(cfg.n_fft).to(device)  # the STFT runs in float32 always
    model.fold_weight_norm()
    return model
