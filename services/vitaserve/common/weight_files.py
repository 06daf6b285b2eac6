"""Finding and reading the weight files of a checkpoint folder, for every loader.

safetensors (the language model, the speech tokenizer): the shards that model.safetensors.index.json
names, else the folder's model*.safetensors. Shapes are read from the headers first, so a mismatch is
reported before a 7B checkpoint is read. Torch pickles (the decoder's flow.pt, hift.pt): plain state
dicts, loaded with weights_only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from vitaserve.common.checkpoint_errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those the index names, or the model*.safetensors there."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"{folder}: the index names missing shard(s) {', '.join(missing)}")
        return [folder / f for f in files]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no {INDEX_FILE} or model.safetensors")
    return files


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every key's shape, from the file headers only; a key in two files is an error."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in shapes:
                    raise CheckpointError(f"{path.name}: key {key} appears in more than one file")
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def read_safetensors(files: list[Path], dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the files, moved to `device` and, when given, cast to `dtype`."""
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    return state


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A torch-pickled state dict (flow.pt, hift.pt) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state
