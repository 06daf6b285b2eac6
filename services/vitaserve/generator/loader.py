"""Load and save VITA-Audio weights in the official format (sharded safetensors + index).

Loading is strict: every key of the model must be in the files with the same shape, and the files
may hold nothing else; otherwise `CheckpointError` names the keys. Weights are built on the meta
device and assigned, so a 7B checkpoint is never materialised twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitaserve.common.state_dict import check_shapes, shapes_of
from vitaserve.common.weight_files import INDEX_FILE, read_safetensors, safetensors_shapes, weight_files
from vitaserve.generator.model import VitaAudioLM
from vitaserve.lmtext.config import LMConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_state_dict_strict(model: torch.nn.Module, folder: Path, dtype: torch.dtype, device) -> None:
    """Check every key and shape from the file headers, then read the tensors into `model`."""
    expected = shapes_of(model.state_dict())
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    files = weight_files(folder)
    check_shapes(expected, safetensors_shapes(files), str(folder), "config.json")
    state = read_safetensors(files, dtype, device)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)


def load_lm(folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> VitaAudioLM:
    """Build the model from config.json and load its weights strictly, in `dtype` on `device`."""
    folder = Path(folder)
    cfg = LMConfig.from_folder(folder)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = VitaAudioLM(cfg)
    load_state_dict_strict(model, folder, dtype, torch.device(device))
    return model.eval().requires_grad_(False)


def save_lm_weights(model: VitaAudioLM, folder: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write sharded safetensors + model.safetensors.index.json, named as the released files are."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        (folder / name).chmod(0o644)  # safetensors writes 0600; checkpoints are shared read-only
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
