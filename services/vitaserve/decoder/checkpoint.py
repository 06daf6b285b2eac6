"""Random-weight GLM-4-Voice decoder folders in the released layout: config.yaml, flow.pt, hift.pt.

The weights are random but shaped like the released ones (same keys, same shapes), and the HiFT
weights are scaled so that the vocoder does what a trained one does in kind: a pitch track that is
partly voiced (so the sine source, its phases and the 256-sample source cache all matter) and a
waveform that mostly stays inside the +-0.99 clamp. tiny is a few MB; released is ~ the real size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitaserve.decoder.hift import HiftConfig, HiFTGenerator, WNConv1d


def random_hift_state(cfg: HiftConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A hift.pt state dict: weight_v ~ N(0, 1/fan_in), weight_g = |v| * gain, Snake alpha ~ 1."""
    g = torch.Generator().manual_seed(seed)
    model = HiFTGenerator(cfg)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, WNConv1d):
            v = module.weight_v
            fan_in = v.shape[0 if module.transposed else 1] * v.shape[2]
            if module.transposed:
                fan_in //= max(module.stride, 1)  # each output sees kernel / stride taps per input
            w = torch.randn(v.shape, generator=g) / fan_in**0.5
            gain = 0.5 if ".convs" in name else 1.0  # residual branches: keep the sum bounded
            state[f"{name}.weight_v"] = w
            state[f"{name}.weight_g"] = torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True) * gain
            state[f"{name}.bias"] = torch.randn(v.shape[1 if module.transposed else 0], generator=g) * 0.01
    for name, p in model.named_parameters():
        if name in state:
            continue
        if name.endswith(".alpha"):
            state[name] = 1.0 + 0.2 * torch.rand(p.shape, generator=g)
        elif name.endswith("weight"):
            state[name] = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        else:
            state[name] = torch.randn(p.shape, generator=g) * 0.01
    # pitch: |linear(features)| around 100 Hz, crossing the 10 Hz voicing threshold now and then
    state["f0_predictor.classifier.weight"] *= 150.0
    state["f0_predictor.classifier.bias"].fill_(60.0)
    # STFT head: log-magnitude around -3 so the iSTFT output is speech-level, not clipped
    half = cfg.n_fft // 2 + 1
    state["conv_post.weight_g"][:half] *= 0.3
    state["conv_post.bias"][:half] = -3.0
    return state


def write_decoder_checkpoint(out_dir: str | Path, preset: str, seed: int = 0) -> Path:
    """Write out_dir/{config.yaml, flow.pt, hift.pt} for preset "tiny" or "released"."""
    from vitaserve.decoder.flow import random_flow_state_dict
    from vitaserve.decoder.flow_config import FlowConfig
    from vitaserve.decoder.yaml_config import decoder_yaml_for_preset, dump_decoder_yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = decoder_yaml_for_preset(preset)
    dump_decoder_yaml(cfg, out / "config.yaml")
    torch.save(random_flow_state_dict(FlowConfig.from_yaml_dict(cfg["flow"]), seed), out / "flow.pt")
    torch.save(random_hift_state(HiftConfig.from_yaml_dict(cfg["hift"]), seed), out / "hift.pt")
    return out
