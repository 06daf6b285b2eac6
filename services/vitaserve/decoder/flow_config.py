"""Configuration of the GLM-4-Voice flow model (tokens -> mel), read from the decoder's config.yaml.

`FlowConfig.from_yaml_dict(cfg["flow"])` takes the `flow:` section as `load_decoder_yaml` returns it
(`!new:` mappings with a "_class" entry). Defaults are the official constructors' defaults, so a
key missing from a YAML means what it means to the official code. Settings the released decoder does
not use (a CNN module, macaron feed-forward, other attention or input layers) are refused with a
clear message rather than silently built differently.

`released_decoder_yaml()` and `tiny_decoder_yaml()` are the two decoder presets as dicts (whole file:
sample_rate, spk_embed_dim, llm, flow, hift), written by `dump_decoder_yaml`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from vitaserve.common.audio_facts import AUDIO_CODEBOOK_SIZE, DECODER_RATE, TOKENS_PER_SECOND
from vitaserve.decoder.yaml_config import DecoderConfigError

FLOW_CLASS = "cosyvoice.flow.flow.MaskedDiffWithXvec"
ENCODER_CLASS = "cosyvoice.transformer.encoder.BlockConformerEncoder"
REGULATOR_CLASS = "cosyvoice.flow.length_regulator.InterpolateRegulator"
CFM_CLASS = "cosyvoice.flow.flow_matching.ConditionalCFM"
ESTIMATOR_CLASS = "cosyvoice.flow.decoder.ConditionalDecoder"


@dataclass(frozen=True)
class EncoderConfig:
    """BlockConformerEncoder: a conformer without conv module whose attention sees whole blocks."""

    input_size: int = 512
    output_size: int = 256
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 6
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    input_layer: str = "conv2d"
    pos_enc_layer_type: str = "rel_pos"
    normalize_before: bool = True
    static_chunk_size: int = 0
    use_dynamic_chunk: bool = False
    macaron_style: bool = True
    selfattention_layer_type: str = "rel_selfattn"
    activation_type: str = "swish"
    use_cnn_module: bool = True
    key_bias: bool = True
    block_size: int = 25  # released: 10 tokens, hence "decoding can start from 10 tokens"


@dataclass(frozen=True)
class LengthRegulatorConfig:
    channels: int = 80
    sampling_ratios: tuple[int, ...] = (1, 1, 1, 1)
    out_channels: int | None = None
    groups: int = 1


@dataclass(frozen=True)
class EstimatorConfig:
    """ConditionalDecoder: the 1-D U-Net with transformer blocks that predicts the flow's velocity."""

    in_channels: int = 320  # x, mu, speaker, prompt-mel condition: 4 x 80
    out_channels: int = 80
    channels: tuple[int, ...] = (256, 256)
    dropout: float = 0.05
    attention_head_dim: int = 64
    n_blocks: int = 1
    num_mid_blocks: int = 2
    num_heads: int = 4
    act_fn: str = "snake"


@dataclass(frozen=True)
class CFMConfig:
    in_channels: int = 240
    n_spks: int = 1
    spk_emb_dim: int = 64
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7  # released: CFG weight, the guidance branch sees true zeros
    reg_loss_type: str = "l1"


@dataclass(frozen=True)
class FlowConfig:
    """MaskedDiffWithXvec: token embedding -> block conformer -> length regulator -> CFM."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    output_type: str = "mel"
    vocab_size: int = 4096
    input_frame_rate: float = 50  # released: 12.5 tokens per second
    only_mask_loss: bool = True
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    length_regulator: LengthRegulatorConfig = field(default_factory=LengthRegulatorConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    @classmethod
    def from_yaml_dict(cls, flow: dict) -> "FlowConfig":
        """Build from the `flow:` section of a decoder config.yaml (as `load_decoder_yaml` reads it)."""
        body = _section(flow, FLOW_CLASS, "flow")
        encoder = _section(body.pop("encoder", None), ENCODER_CLASS, "flow.encoder")
        regulator = _section(body.pop("length_regulator", None), REGULATOR_CLASS, "flow.length_regulator")
        decoder = _section(body.pop("decoder", None), CFM_CLASS, "flow.decoder")
        estimator = _section(decoder.pop("estimator", None), ESTIMATOR_CLASS, "flow.decoder.estimator")
        params = decoder.pop("cfm_params", {}) or {}
        if params.get("_class") == "omegaconf.DictConfig":  # the released file wraps it: content: {...}
            params = params.get("content", {})
        params = {k: v for k, v in params.items() if not k.startswith("_")}
        for key in ("decoder_conf", "mel_feat_conf"):  # training-only defaults of the official class
            body.pop(key, None)
        cfg = cls(
            **_known(cls, body, "flow", skip={"encoder", "length_regulator", "cfm", "estimator"}),
            encoder=EncoderConfig(**_known(EncoderConfig, encoder, "flow.encoder")),
            length_regulator=LengthRegulatorConfig(
                **_tuples(_known(LengthRegulatorConfig, regulator, "flow.length_regulator"), "sampling_ratios")
            ),
            cfm=CFMConfig(**_known(CFMConfig, {**decoder, **params}, "flow.decoder")),
            estimator=EstimatorConfig(
                **_tuples(_known(EstimatorConfig, estimator, "flow.decoder.estimator"), "channels")
            ),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        e, est, cfm = self.encoder, self.estimator, self.cfm
        unsupported = {
            "flow.encoder.input_layer": (e.input_layer, "linear"),
            "flow.encoder.pos_enc_layer_type": (e.pos_enc_layer_type, "rel_pos_espnet"),
            "flow.encoder.selfattention_layer_type": (e.selfattention_layer_type, "block_rel_selfattn"),
            "flow.encoder.use_cnn_module": (e.use_cnn_module, False),
            "flow.encoder.macaron_style": (e.macaron_style, False),
            "flow.encoder.normalize_before": (e.normalize_before, True),
            "flow.encoder.static_chunk_size": (e.static_chunk_size, 0),
            "flow.encoder.use_dynamic_chunk": (e.use_dynamic_chunk, False),
            "flow.decoder.solver": (cfm.solver, "euler"),
            "flow.output_type": (self.output_type, "mel"),
        }
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise DecoderConfigError(f"{name} is {value!r}; only the released decoder's {wanted!r} is supported")
        if e.activation_type not in ("swish", "relu", "gelu", "tanh"):
            raise DecoderConfigError(f"flow.encoder.activation_type {e.activation_type!r} is not supported")
        if est.act_fn not in ("gelu", "gelu-approximate"):
            raise DecoderConfigError(f"flow.decoder.estimator.act_fn {est.act_fn!r} is not supported (gelu only)")
        if cfm.t_scheduler not in ("cosine", "linear"):
            raise DecoderConfigError(f"flow.decoder.cfm_params.t_scheduler {cfm.t_scheduler!r} is not supported")
        if e.output_size % e.attention_heads:
            raise DecoderConfigError("flow.encoder.output_size must be a multiple of attention_heads")
        if any(c % 8 for c in est.channels):
            raise DecoderConfigError("flow.decoder.estimator.channels must be multiples of 8 (GroupNorm(8))")
        if est.in_channels != 4 * self.output_size or est.out_channels != self.output_size:
            raise DecoderConfigError(
                f"flow.decoder.estimator in/out channels {est.in_channels}/{est.out_channels} must be "
                f"4 x / 1 x flow.output_size ({self.output_size}): x, mu, speaker and prompt mel are stacked"
            )
        if self.length_regulator.channels != self.output_size:
            raise DecoderConfigError("flow.length_regulator.channels must equal flow.output_size")


def _section(node, class_path: str, where: str) -> dict:
    if not isinstance(node, dict):
        raise DecoderConfigError(f"{where}: missing (expected a !new:{class_path} mapping)")
    found = node.get("_class")
    if found is not None and found != class_path:
        raise DecoderConfigError(f"{where} is !new:{found}; only !new:{class_path} is supported")
    return {k: v for k, v in node.items() if k != "_class"}


def _known(cls, values: dict, where: str, skip: set[str] = frozenset()) -> dict:
    names = {f for f in cls.__dataclass_fields__ if f not in skip}
    extra = sorted(k for k in values if k not in names and not k.startswith("_"))
    if extra:
        raise DecoderConfigError(f"{where}: unknown setting(s) {', '.join(extra)}")
    return {k: v for k, v in values.items() if k in names}


def _tuples(values: dict, *keys: str) -> dict:
    return {k: tuple(v) if k in keys and v is not None else v for k, v in values.items()}


# ------------------------------------------------------------------------------------------------
# Presets. "released" holds the values of THUDM/glm-4-voice-decoder/config.yaml; "tiny" keeps the
# structure (80 mel bins, 16384 tokens, 12.5 Hz, block 10, 4 regulator convs) with small widths.

_SEEDS = {
    f"__set_seed{i + 1}": {"_apply": fn, "_args": [1986]}
    for i, fn in enumerate(("random.seed", "numpy.random.seed", "torch.manual_seed", "torch.cuda.manual_seed_all"))
}

# CosyVoice's text-to-token LM: declared by the released file, unused by the decoder; kept so that our
# file and the released one share layout (and load the same way with the official code).
_LLM = {
    "_class": "cosyvoice.llm.llm.TransformerLM",
    "text_encoder_input_size": 512,
    "llm_input_size": 1024,
    "llm_output_size": 1024,
    "text_token_size": 51866,
    "speech_token_size": 4096,
    "length_normalized_loss": True,
    "lsm_weight": 0,
    "spk_embed_dim": 192,
    "text_encoder": {
        "_class": "cosyvoice.transformer.encoder.ConformerEncoder",
        "input_size": 512, "output_size": 1024, "attention_heads": 8, "linear_units": 2048, "num_blocks": 3,
        "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0,
        "normalize_before": True, "input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "rel_selfattn", "use_cnn_module": False, "macaron_style": False,
        "use_dynamic_chunk": False, "use_dynamic_left_chunk": False, "static_chunk_size": 1,
    },
    "llm": {
        "_class": "cosyvoice.transformer.encoder.TransformerEncoder",
        "input_size": 1024, "output_size": 1024, "attention_heads": 8, "linear_units": 2048, "num_blocks": 7,
        "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0,
        "input_layer": "linear_legacy", "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "rel_selfattn", "static_chunk_size": 1,
    },
}

_FLOW = {
    "_class": FLOW_CLASS,
    "input_size": 512,
    "output_size": 80,
    "spk_embed_dim": 192,
    "output_type": "mel",
    "vocab_size": AUDIO_CODEBOOK_SIZE,
    "input_frame_rate": TOKENS_PER_SECOND,
    "only_mask_loss": True,
    "encoder": {
        "_class": ENCODER_CLASS,
        "output_size": 512, "attention_heads": 8, "linear_units": 2048, "num_blocks": 6,
        "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
        "normalize_before": True, "input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "block_rel_selfattn", "block_size": 10, "input_size": 512,
        "use_cnn_module": False, "macaron_style": False,
    },
    "length_regulator": {"_class": REGULATOR_CLASS, "channels": 80, "sampling_ratios": [1, 1, 1, 1]},
    "decoder": {
        "_class": CFM_CLASS,
        "in_channels": 240,
        "n_spks": 1,
        "spk_emb_dim": 80,
        "cfm_params": {
            "_class": "omegaconf.DictConfig",
            "content": {
                "sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine", "training_cfg_rate": 0.2,
                "inference_cfg_rate": 0.7, "reg_loss_type": "l1",
            },
        },
        "estimator": {
            "_class": ESTIMATOR_CLASS,
            "in_channels": 320, "out_channels": 80, "channels": [256, 256], "dropout": 0,
            "attention_head_dim": 64, "n_blocks": 4, "num_mid_blocks": 12, "num_heads": 8, "act_fn": "gelu",
        },
    },
}

_HIFT = {
    "_class": "cosyvoice.hifigan.generator.HiFTGenerator",
    "in_channels": 80,
    "base_channels": 512,
    "nb_harmonics": 8,
    "sampling_rate": DECODER_RATE,
    "nsf_alpha": 0.1,
    "nsf_sigma": 0.003,
    "nsf_voiced_threshold": 10,
    "upsample_rates": [8, 8],
    "upsample_kernel_sizes": [16, 16],
    "istft_params": {"n_fft": 16, "hop_len": 4},
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "source_resblock_kernel_sizes": [7, 11],
    "source_resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    "lrelu_slope": 0.1,
    "audio_limit": 0.99,
    "f0_predictor": {
        "_class": "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
        "num_class": 1, "in_channels": 80, "cond_channels": 512,
    },
}


def released_decoder_yaml() -> dict:
    """The released decoder config.yaml as a dict (references resolved)."""
    return copy.deepcopy({
        **_SEEDS,
        "sample_rate": DECODER_RATE,
        "text_encoder_input_size": 512,
        "llm_input_size": 1024,
        "llm_output_size": 1024,
        "spk_embed_dim": 192,
        "llm": _LLM,
        "flow": _FLOW,
        "hift": _HIFT,
    })


def tiny_decoder_yaml() -> dict:
    """Same structure and interfaces (80 mels, 16384 tokens, block 10), a few MB of weights."""
    cfg = released_decoder_yaml()
    flow = cfg["flow"]
    flow["input_size"] = 32
    flow["encoder"].update(input_size=32, output_size=64, attention_heads=2, linear_units=128, num_blocks=2)
    flow["decoder"]["estimator"].update(
        channels=[32, 32], attention_head_dim=16, n_blocks=1, num_mid_blocks=2, num_heads=2
    )
    cfg["hift"]["base_channels"] = 64
    cfg["hift"]["f0_predictor"]["cond_channels"] = 64
    return cfg
