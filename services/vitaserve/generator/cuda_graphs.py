"""Decode steps (a backbone step, an MCTP step) at static shapes, replayed as CUDA graphs.

On a GPU a decode step of a 7B model is ~30 layers x ~15 kernels, and launching them from Python
costs more than running them at small batch sizes. A decode step has few rows per sequence: one for
a backbone step; for an MCTP module, the rows its cache has not seen since its last step (a few in
boost and balance, 11 in turbo). So a step pads its sequences up to a batch bucket (1, 2, 4, ...) and
their rows up to a rows bucket (1, 2, 4, 8, 16) with padding entries (cache index -1, as BatchIndex
marks padding; see StaticRows), attends a power-of-two number of keys, and runs
`VitaAudioLM.forward_static`, whose shapes depend only on (batch, rows, keys, module). On cuda each
such key is captured once as a CUDA graph and replayed; its inputs go in with one asynchronous
host-to-device copy (two for MCTP: the rows' places), and nothing waits for the device (the step's one sync is the engine reading its
sampled ids). On the CPU the same static forward runs eagerly: how the suite checks it against the
eager path. Prefills (more rows than the largest rows bucket) stay on the eager path.

Use: `DecodeGraphs.attach(model)` once after `setup_caches`; runner.forward_group then sends each
group of plans of one kind and module that `fits` to `model.decode_graphs.forward_plans` instead of
the eager runner.forward_plans. Nothing attaches it by default (benchmarks/gpu_check.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROW_BUCKETS = (1, 2, 4, 8, 16)
MIN_KEYS = 64  # smallest key bucket: fewer graphs for short contexts, a negligible masked tail


def bucket_of(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding n rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest batch bucket ({buckets[-1]})")


def key_bucket(kv_len: int, max_len: int) -> int:
    """Keys a step attends: the next power of two >= kv_len (at least MIN_KEYS), at most the cache."""
    n = MIN_KEYS
    while n < kv_len:
        n *= 2
    return min(n, max_len)


@dataclass
class _Inputs:
    """The static input buffers of one (batch, rows) bucket, shared by every graph of that shape."""

    ints: torch.Tensor  # [4, B, T] long on the device: ids, rope positions, slots (per row), cache indices
    hidden: torch.Tensor  # [B, T, H] for MCTP steps

    @property
    def ids(self) -> torch.Tensor:
        return self.ints[0]

    @property
    def rope(self) -> torch.Tensor:
        return self.ints[1]

    @property
    def slots(self) -> torch.Tensor:
        return self.ints[2][:, 0]

    @property
    def cache_index(self) -> torch.Tensor:
        return self.ints[3]


class DecodeGraphs:
    def __init__(self, model, buckets: tuple[int, ...] = BATCH_BUCKETS, row_buckets: tuple[int, ...] = ROW_BUCKETS,
                 capture: bool | None = None):
        """capture: record CUDA graphs (default: when the model is on cuda). Without, the static
        forward runs eagerly: the CPU path, identical in what it computes."""
        if model.num_slots < 1:
            raise ValueError("setup_caches must run before DecodeGraphs")
        self.model = model
        self.device = model.lm_head.weight.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a cuda device")
        self.buckets = tuple(b for b in buckets if b < model.num_slots) + (bucket_of(model.num_slots, buckets),)
        self.row_buckets = row_buckets
        self.inputs: dict[tuple[int, int], _Inputs] = {}
        self.graphs: dict[tuple[int, int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.replays = 0  # steps served by a replay (the benchmarks print it)
        self.eager_steps = 0  # steps served by the static forward without a graph

    @classmethod
    def attach(cls, model, buckets: tuple[int, ...] = BATCH_BUCKETS, row_buckets: tuple[int, ...] = ROW_BUCKETS,
               capture: bool | None = None) -> "DecodeGraphs":
        model.decode_graphs = cls(model, buckets, row_buckets, capture)
        model.rope_table_for_static()
        return model.decode_graphs

    def fits(self, plans) -> bool:
        """Whether a group of plans has a static shape here (a prefill usually has not)."""
        return len(plans) <= self.buckets[-1] and max(len(p.ids) for p in plans) <= self.row_buckets[-1]

    def forward_plans(self, plans) -> list[torch.Tensor]:
        """Hidden rows [T_i, H] for each plan (all of one kind and module): runner.forward_plans's
        contract, for a group that fits."""
        if not self.fits(plans):
            raise ValueError(f"{len(plans)} plans of up to {max(len(p.ids) for p in plans)} rows exceed the static "
                             f"shapes ({self.buckets[-1]} x {self.row_buckets[-1]}); run them on the eager path")
        module = plans[0].module if plans[0].kind == "m" else -1
        out = self.run(module, [p.ids for p in plans], [p.rope_start for p in plans], [p.seq.slot for p in plans],
                       [p.cache_start for p in plans], [p.hidden for p in plans] if module >= 0 else None)
        return [out[b, : len(p.ids)] for b, p in enumerate(plans)]

    @torch.inference_mode()
    def run(self, module: int, ids: list[list[int]], rope_starts: list[int], slots: list[int],
            cache_starts: list[int], hidden: list[torch.Tensor] | None) -> torch.Tensor:
        """Normed hidden [n, T, H] of n sequences, sequence b's rows ids[b] at rope positions and cache
        indices from its starts; module -1 is the backbone; hidden[b] [len(ids[b]), H] for MCTP."""
        n, lengths = len(ids), [len(r) for r in ids]
        if max(c + k for c, k in zip(cache_starts, lengths)) > self.model.max_len:
            raise ValueError(f"sequence longer than the KV cache ({self.model.max_len} tokens)")
        bucket, rows = bucket_of(n, self.buckets), bucket_of(max(lengths), self.row_buckets)
        keys = key_bucket(max(c + k for c, k in zip(cache_starts, lengths)), self.model.max_len)
        inp = self._inputs(bucket, rows)
        pad_row = [0] * rows
        flat_ids, flat_rope, flat_slots, flat_index, positions = [], [], [], [], []
        for b in range(bucket):
            k = lengths[b] if b < n else 0
            if b < n:
                flat_ids += ids[b] + pad_row[k:]
                flat_rope += list(range(rope_starts[b], rope_starts[b] + k)) + pad_row[k:]
                flat_slots += [slots[b]] * rows
                flat_index += list(range(cache_starts[b], cache_starts[b] + k)) + [-1] * (rows - k)
                positions += range(b * rows, b * rows + k)
            else:  # a padding row: the scratch slot, every entry padding
                flat_ids += pad_row
                flat_rope += pad_row
                flat_slots += [self.model.num_slots] * rows
                flat_index += [-1] * rows
        host = torch.tensor([flat_ids, flat_rope, flat_slots, flat_index]).view(4, bucket, rows)
        if self.device.type == "cuda":
            # a fresh block of torch's pinned-host cache: it is not reused before this copy has run
            # (an event guards it), so the copy need not be waited for
            host = host.pin_memory()
        inp.ints.copy_(host, non_blocking=True)
        if hidden is not None:  # every sequence's rows in one copy, at their (row, entry) places
            where = torch.tensor(positions)
            if self.device.type == "cuda":
                where = where.pin_memory()
            inp.hidden.view(bucket * rows, -1).index_copy_(0, where.to(self.device, non_blocking=True),
                                                            torch.cat(hidden))
        if not self.capture:
            self.eager_steps += 1
            return self._forward(module, inp, keys)[:n]
        key = (bucket, rows, keys, module)
        if key not in self.graphs:
            self.graphs[key] = self._capture(module, inp, keys)
        graph, out = self.graphs[key]
        graph.replay()
        self.replays += 1
        return out[:n].clone()  # the next replay overwrites `out`; sequences keep these rows

    def _forward(self, module: int, inp: _Inputs, keys: int) -> torch.Tensor:
        return self.model.forward_static(module, inp.ids, inp.rope, inp.slots, inp.cache_index,
                                         inp.hidden if module >= 0 else None, keys)

    def _inputs(self, bucket: int, rows: int) -> _Inputs:
        if (bucket, rows) not in self.inputs:
            self.inputs[(bucket, rows)] = _Inputs(
                ints=torch.zeros(4, bucket, rows, dtype=torch.long, device=self.device),
                hidden=torch.zeros(bucket, rows, self.model.config.hidden_size, dtype=self.model.lm_head.weight.dtype,
                                   device=self.device))
        return self.inputs[(bucket, rows)]

    def _capture(self, module: int, inp: _Inputs, keys: int):
        """Warm up on a side stream, then record. The warm-up runs write this step's own k/v rows
        (the values the replay writes again), so capturing on a live step changes nothing."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(module, inp, keys)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a sender thread reading ids) do not void the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(module, inp, keys)
        return graph, out
