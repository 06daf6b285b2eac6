"""nn.Linear with the few-row products of decode steps computed the way the CPU's BLAS does fastest.

Same parameters, same state_dict names as nn.Linear (a checkpoint loads unchanged). On the CPU a
product with few rows (a decode or MCTP step: one row per call) runs as W @ x^T, and a single row as
two: measured on the 2-core AMD EPYC machines of this project (torch 2.13, MKL 2024.2, 2 threads),
F.linear's [b, 512] x [168072, 512]^T lm_head took 74 ms at b = 1 and 132-210 ms at b = 2..16, while
W @ x^T took 35-92 ms at b = 2..16 and 44 ms with the single row doubled (the b = 1 product is a
matrix-vector product that reads W at ~5 GB/s, the two-column product streams it); the decoder
layers' [16, 512] x [3072, 512]^T went from 3.0 to 1.0 ms. From 16 rows the lm_head runs a block of
its rows at a time, so the result is transposed while it is still in the cache (`_blocked`: 16 calls'
decode steps 21 % faster, identical tokens). Prefills (many rows) and every other device keep
F.linear. The results equal F.linear's to float32 rounding (a different summation order):
tests/test_linear.py bounds the difference and checks greedy tokens through the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 64  # decode steps of up to 64 calls; a prefill's many rows keep F.linear
# a single row is doubled only where W is far larger than the caches (a matrix-vector product over it
# is bound by memory): the lm_head (86 M weights at 512 hidden); the layers' few-M weights are not
LARGE_WEIGHT = 16 * 1024 * 1024
# from this many rows a large product runs in blocks of BLOCK weight rows (Linear._blocked); below it
# (measured at 2-8 rows) one product and one transposition are as fast or faster
BLOCKED_ROWS = 16
BLOCK = 2048


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.device.type != "cpu" or not 0 < rows <= FEW_ROWS or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        large = self.weight.numel() >= LARGE_WEIGHT
        grad = torch.is_grad_enabled() and self.weight.requires_grad  # mm(out=) has no backward
        if rows >= BLOCKED_ROWS and large and not grad:
            out = self._blocked(flat)
        else:
            if rows == 1 and large:
                out = torch.mm(self.weight, torch.cat([flat, flat]).t())[:, :1]
            else:
                out = torch.mm(self.weight, flat.t())
            out = out.t().contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _blocked(self, flat: torch.Tensor) -> torch.Tensor:
        """W @ x^T a block of W's rows at a time, each block's [BLOCK, b] result turned into its
        columns of the [b, out] output while it is still in the cache: one transposition of the
        whole [out, b] result (10.7 MB for the lm_head at b = 16) costs more than the blocks' products
        save (the lm_head at b = 16: 96 -> 75 ms; b = 32: 118 -> 90 ms; b = 64: 242 -> 165 ms)."""
        out = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype)
        scratch = torch.empty(BLOCK, flat.shape[0], dtype=flat.dtype)
        xt = flat.t()
        for start in range(0, self.out_features, BLOCK):
            end = min(start + BLOCK, self.out_features)
            part = scratch[: end - start]
            torch.mm(self.weight[start:end], xt, out=part)
            out[:, start:end].copy_(part.t())
        return out
