"""Shared fixtures: tiny checkpoints generated once per test session in the official formats."""

from __future__ import annotations

import pytest
import torch

# Tests share 2 cores with the servers they start (Triton, the in-process cluster): one torch thread
# per process avoids OpenMP threads spinning against each other, which slows everything tenfold.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    from vitaserve.generator.checkpoint import write_lm_checkpoint

    return write_lm_checkpoint(tmp_path_factory.mktemp("ckpt") / "lm", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    from vitaserve.generator.generate import LanguageModel

    return LanguageModel.from_folder(tiny_lm_dir, num_slots=4, max_len=512)
