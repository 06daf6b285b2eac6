"""Time the OFFICIAL VITA-Audio model code (HF `generate`) on one of our checkpoint folders.

Runs in a separate interpreter that has transformers==4.48.3 (the official code's pin), e.g.

    /tmp/offvenv/bin/python benchmarks/official_compare.py --official-repo /tmp/vita --lm /tmp/ck_mini/lm

Nothing of the official repository is copied here: its modeling package
(vita_audio/models/qwen2_mtp_v4_48_3) is imported at run time from --official-repo.

Per mode it runs HF `generate` greedily (do_sample False; the folder's generation_config.json keeps
repetition_penalty 1.05, as the official code does), with `generation_config.mtp_inference_mode` set to
the mode's list and a streamer that timestamps every new token, and prints one JSON object:
{"modes": {name: {"tokens", "token_ms", "first_chunk_ms", "ms_per_token", "tokens_per_s", "error"}}, ...}.

Timing: token_ms[k] is the time from just before `generate` until token k reached the streamer
(prefill included), like tools/inference_sts.py's benchmark_generate_stream, which runs `generate` in a
thread and timestamps each token as its consumer loop receives it (--stream-timing thread does exactly
that; the default, put, stamps inside the streamer's put() in the generating thread and so leaves the
consumer thread's wake-up latency out, the way our own generator measures).

Attention on CPU: the official code was written for attn_implementation="flash_attention_2" (whose
causal mask is bottom-right aligned). Under "sdpa"/"eager" its multi-row forwards over a non-empty cache
(a backbone step after MCTP steps; every MCTP module catching up) get a wrong mask. --causal-fix
(opt in) makes them causal-correct WITHOUT touching the official files: at run time it replaces the
mask builder of the loaded Qwen2Model class by one that returns None (what the flash-attention path
returns for an all-ones mask) and wraps the attention function so that a query block of q rows over k
keys attends with the bottom-right aligned causal mask (row i sees keys 0..k-q+i), i.e. the semantics of
flash-attention's causal=True. --trace-masks records, per forward, the query rows, key length and
whether the mask the attention kernel actually got is that causal mask.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import queue
import random
import sys
import threading
import time
import traceback
from pathlib import Path

MODES = {
    "vanilla": [8192, 0],
    "balance": [1, 4, 3, 8, 4, 10],
    "boost": [1, 10, 4, 10],
    "turbo": [1, 10],
}
FIRST_CHUNK_TOKENS = 11  # one backbone token + a 10-token audio chunk
OFFICIAL_PACKAGE = "vita_audio/models/qwen2_mtp_v4_48_3"


def load_official(repo: Path):
    """Import the official modeling package from the repository checkout, under a private name."""
    pkg_dir = repo / OFFICIAL_PACKAGE
    if not (pkg_dir / "modeling_qwen2.py").exists():
        raise SystemExit(f"{pkg_dir}/modeling_qwen2.py not found: is --official-repo the VITA-Audio checkout?")
    name = "official_qwen2_mtp"
    spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                  submodule_search_locations=[str(pkg_dir)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return pkg, sys.modules[name + ".modeling_qwen2"]


def random_prompt(seed: int, length: int, limit: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, limit) for _ in range(length)]


class StampStreamer:
    """HF streamer: the first put() is the prompt; every later put() is one new token."""

    def __init__(self, threaded: bool):
        self.threaded = threaded
        self.start = 0.0
        self.tokens: list[int] = []
        self.stamps: list[float] = []
        self.q: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            if self.threaded:
                self.q.put(t)
            else:
                self.tokens.append(t)
                self.stamps.append(time.perf_counter() - self.start)

    def end(self):
        if self.threaded:
            self.q.put(None)


class MaskTrace:
    """Per attention call of a forward's first layer: rows, keys, and whether the mask is causal."""

    def __init__(self, first_mtp_layer: int):
        self.first_mtp_layer = first_mtp_layer
        self.records: list[dict] = []

    def note(self, layer: int, q: int, k: int, mask, is_causal_flag: bool | None, impl: str):
        if layer != 0 and layer < self.first_mtp_layer:
            return  # one record per forward: backbone layer 0, or the MCTP module's only layer
        import torch

        rec = {"layer": layer, "who": "backbone" if layer == 0 else f"mtp{layer - self.first_mtp_layer}",
               "q": q, "k": k, "mask": None if mask is None else list(mask.shape)}
        want = torch.ones(q, k, dtype=torch.bool).tril(diagonal=k - q)  # bottom-right aligned causal
        if mask is None:
            # sdpa with no mask uses is_causal = q > 1, which torch aligns top-left; eager: no mask at all
            if q == 1:
                rec["status"] = "ok"
            elif impl == "sdpa" and is_causal_flag is not False:
                got = torch.ones(q, k, dtype=torch.bool).tril(diagonal=0)
                rec["status"] = "ok" if torch.equal(got, want) else "top-left causal (wrong)"
            else:
                rec["status"] = "no mask (non-causal)"
        else:
            m = mask[0, 0, :, :k] if mask.dim() == 4 else mask[..., :k]
            if tuple(m.shape) != (q, k):
                rec["status"] = f"shape mismatch: mask {tuple(mask.shape)} vs scores ({q}, {k})"
            else:
                got = m > torch.finfo(m.dtype).min / 2 if m.dtype.is_floating_point else m.bool()
                if torch.equal(got, want):
                    rec["status"] = "ok"
                else:
                    future = int((got & ~want).sum())
                    rec["status"] = f"non-causal ({future} future keys visible)"
        self.records.append(rec)


def install_hooks(off, impl: str, causal_fix: bool, trace: MaskTrace | None):
    """Runtime monkeypatches on the imported official module (files untouched)."""
    import torch

    base_fns = {}
    if impl == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        base_fns["sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
    else:
        base_fns["eager"] = off.eager_attention_forward
    base = base_fns[impl]

    def attention(module, query, key, value, attention_mask, **kwargs):
        q, k = query.shape[-2], key.shape[-2]
        if causal_fix:
            if q == 1:
                attention_mask = None
            else:
                keep = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(diagonal=k - q)
                attention_mask = torch.zeros(q, k, dtype=query.dtype, device=query.device).masked_fill(
                    ~keep, torch.finfo(query.dtype).min)[None, None]
            if impl == "sdpa":
                kwargs["is_causal"] = False
        if trace is not None:
            trace.note(module.layer_idx, q, k, attention_mask, kwargs.get("is_causal"), impl)
        return base(module, query, key, value, attention_mask, **kwargs)

    if impl == "sdpa":
        ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    else:
        off.eager_attention_forward = attention  # the name Qwen2Attention.forward looks up

    if causal_fix:
        def no_mask(self, attention_mask, input_tensor, cache_position, past_key_values, output_attentions):
            return None  # as the flash_attention_2 branch does for an all-ones mask

        off.Qwen2Model._update_causal_mask = no_mask


def load_model(pkg, lm_dir: Path, impl: str, device: str = "cpu", dtype: str = "float32", random_init: bool = False):
    """From the folder's weights, or (random_init) with random weights created on `device`: then the
    folder needs only config.json and generation_config.json (a 7B model never touches the disk)."""
    import torch
    from transformers import GenerationConfig

    torch_dtype = getattr(torch, dtype)
    config = pkg.Qwen2MTPConfig.from_pretrained(lm_dir)
    if random_init:
        with torch.device(device):
            model = pkg.Qwen2MTPForCausalLM._from_config(config, attn_implementation=impl, torch_dtype=torch_dtype)
        model = model.eval()
    else:
        model = pkg.Qwen2MTPForCausalLM.from_pretrained(
            lm_dir, config=config, torch_dtype=torch_dtype, attn_implementation=impl).eval().to(device)
    gc = GenerationConfig.from_pretrained(lm_dir)
    gc.do_sample = False
    gc.temperature, gc.top_k, gc.top_p = 1.0, 50, 1.0  # as inference_sts.py; unused when greedy
    gc.num_beams = 1
    gc.use_cache = True
    gc.eos_token_id = None  # run all max_new_tokens (our --ignore-eos); no logit is altered
    model.generation_config = gc
    return model


def run_mode(model, prompt: list[int], mode: list[int], max_new_tokens: int, threaded: bool,
             scores: list | None = None):
    """scores: if a list, gets per step [argmax id, top-1 score, top-2 score] (after the repetition penalty)."""
    import torch

    model.generation_config.mtp_inference_mode = list(mode)
    model.generation_config.max_new_tokens = max_new_tokens
    input_ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    streamer = StampStreamer(threaded)
    error = None

    def work():
        nonlocal error
        try:
            with torch.inference_mode():
                extra = {}
                if scores is not None:
                    from transformers import LogitsProcessorList

                    def record(ids, step_scores):  # runs after HF's own processors (repetition penalty)
                        top = step_scores[0].float().topk(2)
                        scores.append([int(top.indices[0]), round(float(top.values[0]), 6),
                                       round(float(top.values[1]), 6)])
                        return step_scores

                    extra["logits_processor"] = LogitsProcessorList([record])
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               streamer=streamer, generation_config=model.generation_config, **extra)
        except Exception as exc:  # record where the official code fails on this backend
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            error_tb = traceback.format_exc().strip().splitlines()
            error = {"message": error, "where": [l.strip() for l in error_tb if l.strip().startswith("File")][-3:]}
            streamer.end()

    streamer.start = time.perf_counter()
    if threaded:
        thread = threading.Thread(target=work)
        thread.start()
        while (t := streamer.q.get()) is not None:
            streamer.stamps.append(time.perf_counter() - streamer.start)
            streamer.tokens.append(t)
        thread.join()
    else:
        work()
    return streamer.tokens, [s * 1000 for s in streamer.stamps], error


def summarize(tokens, token_ms, error):
    n = len(tokens)
    return {
        "tokens": tokens,
        "token_ms": [round(x, 3) for x in token_ms],
        "first_chunk_ms": round(token_ms[FIRST_CHUNK_TOKENS - 1], 3) if n >= FIRST_CHUNK_TOKENS else None,
        "ms_per_token": round(token_ms[-1] / n, 3) if n else None,
        "tokens_per_s": round(n / token_ms[-1] * 1000, 2) if n else None,
        "error": error,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-repo", required=True, type=Path, help="VITA-Audio checkout (has vita_audio/)")
    p.add_argument("--lm", required=True, type=Path, help="checkpoint folder in the official format")
    p.add_argument("--modes", default="vanilla,balance,boost,turbo")
    p.add_argument("--prompt-ids", help="comma-separated ids; default: --prompt-len random text-side ids")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-limit", type=int, default=None,
                   help="random prompt ids are < this (default: the config's bos_token_id, 151643 for the real vocab)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--causal-fix", action="store_true",
                   help="make multi-row forwards over a cache causal-correct (flash-attention semantics)")
    p.add_argument("--trace-masks", action="store_true", help="record per forward whether its mask is causal")
    p.add_argument("--scores", action="store_true",
                   help="keep per step the top-2 scores (a top-2 per step: changes timing a little)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode; the one with the median total is kept")
    p.add_argument("--warmup-tokens", type=int, default=4, help="an untimed vanilla run of this many tokens first")
    p.add_argument("--stream-timing", choices=["put", "thread"], default="put")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--random-init", action="store_true",
                   help="random weights created on --device (timing only; --lm then needs only the config files)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    pkg, off = load_official(args.official_repo.resolve())
    trace = MaskTrace(0) if args.trace_masks else None
    t0 = time.perf_counter()
    model = load_model(pkg, args.lm, args.attn, args.device, args.dtype, args.random_init)
    load_s = time.perf_counter() - t0
    cfg = model.config
    if trace is not None:
        trace.first_mtp_layer = cfg.num_hidden_layers - cfg.num_nextn_predict_layers
    install_hooks(off, args.attn, args.causal_fix, trace)

    if args.prompt_ids:
        prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    else:
        limit = args.text_limit or min(151643, cfg.bos_token_id or cfg.vocab_size)
        prompt = random_prompt(args.seed, args.prompt_len, limit)

    threaded = args.stream_timing == "thread"
    if args.warmup_tokens:
        run_mode(model, prompt, MODES["vanilla"], args.warmup_tokens, threaded)
        if trace is not None:
            trace.records.clear()

    result = {
        "impl": "official", "attn": args.attn, "causal_fix": args.causal_fix,
        "stream_timing": args.stream_timing, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "lm": str(args.lm), "load_s": round(load_s, 2),
        "device": args.device, "dtype": args.dtype, "random_init": args.random_init,
        "prompt": prompt, "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": model.generation_config.repetition_penalty, "modes": {},
    }
    for name in [m for m in args.modes.split(",") if m]:
        mode = MODES[name] if name in MODES else [int(x) for x in name.split("-")]
        runs = []
        for _ in range(max(1, args.repeats)):
            if trace is not None:
                trace.records.clear()
            scores = [] if args.scores else None
            tokens, token_ms, error = run_mode(model, prompt, mode, args.max_new_tokens, threaded, scores)
            runs.append((token_ms[-1] if token_ms else 0.0, tokens, token_ms, error,
                         list(trace.records) if trace is not None else None, scores))
            if error:
                break
        runs.sort(key=lambda r: r[0])
        total, tokens, token_ms, error, records, scores = runs[len(runs) // 2]
        entry = summarize(tokens, token_ms, error)
        entry["mode"] = mode
        entry["schedule"] = "".join(model.mtp_inference_mode[: args.max_new_tokens])
        if len(runs) > 1:
            entry["first_chunk_ms_all"] = [round(r[2][FIRST_CHUNK_TOKENS - 1], 3) for r in runs
                                           if len(r[2]) >= FIRST_CHUNK_TOKENS]
            entry["total_ms_all"] = [round(r[0], 3) for r in runs]
        if records is not None:
            entry["mask_trace"] = records
        if scores is not None:
            entry["scores_top2"] = scores
        result["modes"][name] = entry
        print(f"[official {args.attn}{' +causal-fix' if args.causal_fix else ''}] {name}: "
              f"{len(tokens)} tokens, first chunk {entry['first_chunk_ms']} ms, "
              f"{entry['ms_per_token']} ms/token" + (f", ERROR {error['message']}" if error else ""),
              file=sys.stderr)
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
