"""GLM-4-Voice's flow model (speech tokens -> 80-bin mel at 22050 Hz / hop 256): MaskedDiffWithXvec.

prompt+new tokens -> embedding -> block conformer -> linear -> nearest-neighbour length regulation to
mel frames -> conditional flow matching (Euler ODE, cosine time schedule, classifier-free guidance)
conditioned on the prompt's mel and the speaker embedding -> the mel of the new tokens.

Differences from the official code, all deliberate:
* Modules always run in eval mode. The official AudioDecoder never calls .eval(), so its encoder
  dropout (0.1) stays on and its output is random; eval mode is the model as trained to be used.
* The official solver calls torch.manual_seed(42) before drawing the start noise, reseeding the
  process-wide RNG on every call. We draw from a caller-owned `generator` instead (per stream);
  `torch.Generator().manual_seed(42)`, created per call by the caller, reproduces the official noise
  on CPU. `deterministic=True` uses an all-zero start instead.
* CFG runs the conditional and unconditional estimator passes as one batch of 2, and everything
  that is the same for every ODE step (stacked conditions, masks) is computed once per call.
  Checked against the official code (eval mode, same weights and noise): bit-identical with one
  thread; with more threads the batch-2 kernels split work differently, max |diff| ~5e-6 on mels of
  magnitude ~5.
* Several sequences of EQUAL shapes (new tokens, prompt tokens, prompt mel frames) run as one batch
  (the decoder service batches the same block of concurrent streams); each row draws its start
  noise from its own generator, so a stream's mel does not depend on its batch-mates. Batch 1 runs
  exactly the ops above; a batch equals each sequence alone to float tolerance (GEMM blocking).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitaserve.common.audio_facts import DECODER_RATE, HOP
from vitaserve.common.state_dict import load_strict
from vitaserve.common.weight_files import read_torch_state
from vitaserve.decoder.conformer import BlockConformerEncoder
from vitaserve.decoder.flow_config import (
    CFMConfig,
    FlowConfig,
    LengthRegulatorConfig,
)
from vitaserve.decoder.flow_estimator import ConditionalDecoder
from vitaserve.decoder.rng import Generators, draw
from vitaserve.decoder.yaml_config import load_decoder_yaml


class InterpolateRegulator(nn.Module):
    """Nearest-neighbour resampling of the encoder output to the mel frame count, then
    (conv3 + GroupNorm + Mish) per sampling ratio and a 1x1 conv (keys model.{0,1,3,4,...,12})."""

    def __init__(self, cfg: LengthRegulatorConfig):
        super().__init__()
        ch, out = cfg.channels, cfg.out_channels or cfg.channels
        layers: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            layers += [nn.Conv1d(ch, ch, 3, 1, 1), nn.GroupNorm(cfg.groups, ch), nn.Mish()]
        layers.append(nn.Conv1d(ch, out, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, n_frames: int) -> torch.Tensor:
        """x [B, T_tokens, C] -> [B, n_frames, C] (batch 1: every frame is valid)."""
        x = F.interpolate(x.transpose(1, 2).contiguous(), size=n_frames, mode="nearest")
        return self.model(x).transpose(1, 2).contiguous()


class ConditionalCFM(nn.Module):
    """Euler solver of the flow ODE with classifier-free guidance (the official `decoder` module)."""

    def __init__(self, cfg: CFMConfig, estimator: ConditionalDecoder):
        super().__init__()
        self.cfg = cfg
        self.estimator = estimator

    def t_span(self, n_timesteps: int, device) -> torch.Tensor:
        t_span = torch.linspace(0, 1, n_timesteps + 1, device=device)
        if self.cfg.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        return t_span

    def forward(
        self, z: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
        n_timesteps: int,
    ) -> torch.Tensor:
        """z start noise, mu encoder output, cond prompt mel: [B, 80, T]; mask [1, 1, T] (no padding:
        the rows of a batch have equal lengths); spks [B, 80]."""
        est = self.estimator
        rate = self.cfg.inference_cfg_rate
        b, n, t_len = z.shape[0], z.shape[1], z.shape[-1]
        # Stacked estimator input [x | mu | spks | cond]: rows :B conditional, rows B: the guidance
        # branch with true zeros. Only x changes between steps.
        rows = 2 * b if rate > 0 else b
        stacked = z.new_zeros(rows, est.cfg.in_channels, t_len)
        stacked[:b, n : 2 * n] = mu
        stacked[:b, 2 * n : 3 * n] = spks.unsqueeze(-1)
        stacked[:b, 3 * n : 4 * n] = cond
        levels = est.level_masks(mask, len(est.down_blocks))

        t_span = self.t_span(n_timesteps, z.device)
        t, dt = t_span[0], t_span[1] - t_span[0]
        x = z
        for step in range(1, len(t_span)):
            stacked[:b, :n] = x
            if rows > b:
                stacked[b:, :n] = x
            out = est(stacked, mask, time_emb=est.time_embedding(t), levels=levels)
            dphi_dt = out[:b]
            if rate > 0:
                dphi_dt = (1.0 + rate) * dphi_dt - rate * out[b:]
            x = x + dt * dphi_dt
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x


class FlowModel(nn.Module):
    """MaskedDiffWithXvec with the official attribute names (flow.pt loads with strict=True)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_frame_rate = cfg.input_frame_rate
        self.output_size = cfg.output_size
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = BlockConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = ConditionalCFM(cfg.cfm, ConditionalDecoder(cfg.estimator))
        self.length_regulator = InterpolateRegulator(cfg.length_regulator)
        self.eval()  # no dropout modules exist; eval() only keeps .training honest

    def mel_frames(self, n_tokens: int | torch.Tensor) -> int:
        """Official frame count: int(n / rate * 22050 / 256), in float32 as the official tensor math."""
        n = torch.as_tensor(n_tokens, dtype=torch.int32)
        return int((n / self.input_frame_rate * DECODER_RATE / HOP).int())

    @torch.inference_mode()
    def encode(self, token: torch.Tensor) -> torch.Tensor:
        """[B, N] token ids -> encoder output after encoder_proj, [B, N, 80] (one row per token)."""
        x = self.input_embedding(torch.clamp(token, min=0))
        h = self.encoder(x, torch.full((token.shape[0],), token.shape[1], device=token.device))
        return self.encoder_proj(h)

    @torch.inference_mode()
    def inference(
        self,
        token: torch.Tensor,
        token_len: torch.Tensor | int,
        prompt_token: torch.Tensor,
        prompt_token_len: torch.Tensor | int,
        prompt_feat: torch.Tensor,
        prompt_feat_len: torch.Tensor | int,
        embedding: torch.Tensor,
        n_timesteps: int = 10,
        generator: Generators = None,
        deterministic: bool = False,
    ) -> torch.Tensor:
        """Mel of the NEW tokens only, [B, 80, T]: official flow.inference with option_steps=n_timesteps.

        token [B, N] and prompt_token [B, P] int ids; prompt_feat [B, F, 80] the prompt's mel (F may
        differ from the prompt tokens' natural length, as in the official streaming); embedding
        [B, spk_embed_dim] (zeros = no speaker; its affine bias still conditions, as officially).
        Every row has the same N, P and F (the lengths, ints or [B] tensors, must say so).
        The start noise comes from `generator` (torch.Generator().manual_seed(42) per call = the
        official noise on CPU; a generator on another device draws there and moves the noise), or
        one generator per row, or is all zeros with deterministic=True. With no generator it is
        drawn from (never reseeds) the global CPU RNG."""
        if n_timesteps < 1:
            raise ValueError(f"n_timesteps must be at least 1, got {n_timesteps}")
        b = token.shape[0]
        if b < 1 or prompt_token.shape[0] != b or prompt_feat.shape[0] != b or embedding.shape[0] != b:
            raise ValueError(f"token, prompt_token, prompt_feat and embedding must have the same batch size, got "
                             f"{b}, {prompt_token.shape[0]}, {prompt_feat.shape[0]}, {embedding.shape[0]}")
        device = self.input_embedding.weight.device
        dtype = self.spk_embed_affine_layer.weight.dtype
        n_tok = _one_length(token_len, token.shape[1], "token_len")
        n_prompt = _one_length(prompt_token_len, prompt_token.shape[1], "prompt_token_len")
        n_feat = prompt_feat.shape[1]
        if n_feat:
            _one_length(prompt_feat_len, n_feat, "prompt_feat_len")

        spks = self.spk_embed_affine_layer(F.normalize(embedding.to(device, dtype), dim=1))
        tokens = torch.cat([prompt_token.to(device), token.to(device)], dim=1)
        h = self.encode(tokens)
        frames = self.mel_frames(n_prompt + n_tok)
        if n_feat > frames:
            raise ValueError(f"prompt_feat has {n_feat} frames, more than the {frames} of prompt + new tokens")
        h = self.length_regulator(h, frames)

        cond = torch.zeros(b, self.output_size, frames, device=device, dtype=dtype)
        if n_feat:
            cond[:, :, :n_feat] = prompt_feat.to(device, dtype).transpose(1, 2)
        mu = h.transpose(1, 2).contiguous()
        mask = torch.ones(1, 1, frames, device=device, dtype=dtype)
        z = self.start_noise(mu.shape, device, dtype, generator, deterministic)
        feat = self.decoder(z, mask, mu, spks, cond, n_timesteps)
        return feat[:, :, n_feat:]

    @staticmethod
    def start_noise(shape, device, dtype, generator: Generators, deterministic: bool) -> torch.Tensor:
        if deterministic:
            return torch.zeros(shape, device=device, dtype=dtype)
        return draw("normal", shape, generator, device, dtype)


def _one_length(lengths: torch.Tensor | int | None, actual: int, name: str) -> int:
    """The one length every row has: `lengths` (an int or a [B] tensor) must all equal `actual`."""
    if lengths is None:
        return actual
    values = torch.as_tensor(lengths).reshape(-1).tolist()
    if not values or any(int(v) != actual for v in values):
        raise ValueError(f"{name} must equal the tensor's length {actual} for every row "
                         f"(batched rows have equal lengths), got {values}")
    return actual


def random_flow_state_dict(cfg: FlowConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-weight flow.pt state dict (the official initialisation), reproducible from `seed`
    without touching the process-wide RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FlowModel(cfg).state_dict()


def load_flow(decoder_dir, device="cpu", dtype: torch.dtype = torch.float32) -> FlowModel:
    """Build the flow model from DIR/config.yaml and load DIR/flow.pt strictly."""
    folder = Path(decoder_dir)
    cfg = FlowConfig.from_yaml_dict(load_decoder_yaml(folder / "config.yaml").get("flow"))
    weights = folder / "flow.pt"
    state = read_torch_state(weights)
    with torch.device("meta"):
        model = FlowModel(cfg)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_strict(model, state, str(weights), "config.yaml", assign=True)
    return model.to(device)
