"""GPU check of the engine (issue 15): the 7B shapes in bf16 with random weights made on the GPU, our
engine at batch 1 and 64 (boost) beside the official code at batch 1, against DESIGN.md's GPU targets.

Run it through benchmarks/gpu_check.sh (which sets PYTHONPATH and the carried wheels). It prints a
table and writes JSON ($OUT/gpu_check.json when $OUT is set, else --out). `--dry-run` runs the same
code on the CPU with the tiny shapes, in fp32, in well under a minute; the suite runs it.

Nothing is downloaded and no weights touch the disk: our model is built on the device and filled with
normal(0, 0.02) as make-checkpoint does; the official side gets only config.json and
generation_config.json in a temporary folder and builds its random weights on the device too. The
two sides therefore have different weights: their timings compare, their tokens do not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitaserve.common.audio_facts import TOKENS_PER_SECOND
from vitaserve.common.provenance import provenance
from vitaserve.generator.benchmark import bench_engine, random_prompt
from vitaserve.generator.checkpoint import PRESETS, config_dict, generation_config_dict
from vitaserve.generator.cuda_graphs import DecodeGraphs
from vitaserve.generator.language_model import LanguageModel
from vitaserve.generator.model import VitaAudioLM
from vitaserve.lmtext.config import GenerationDefaults, LMConfig
from vitaserve.lmtext.vocab import AudioVocab

HERE = Path(__file__).resolve().parent
TARGETS = {"first_chunk_ms_batch1": 15.0, "first_chunk_ms_joining_63": 25.0, "tokens_per_s_batch1": 400.0}


def shapes(dry_run: bool) -> dict:
    """What runs: the 7B shapes on cuda, or the tiny ones on the CPU with the same code paths."""
    if dry_run:
        return dict(preset="tiny", device="cpu", dtype=torch.float32, big=3, sweep=(2,), prompt_len=8,
                    max_new_tokens=12, joiners=1, max_len=128, lone_repeats=1)
    return dict(preset="7b", device="cuda", dtype=torch.bfloat16, big=64, sweep=(1, 16, 32, 64, 96, 128),
                prompt_len=32, max_new_tokens=64, joiners=3, max_len=512, lone_repeats=3)


@torch.no_grad()
def random_lm(preset: str, device: str, dtype: torch.dtype, num_slots: int, max_len: int, seed: int = 0) -> LanguageModel:
    """A LanguageModel of the preset's shapes with random weights created on `device` (never on disk)."""
    raw = config_dict(preset)
    cfg = LMConfig.from_dict(raw)
    vocab = AudioVocab(cfg.bos_token_id)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = VitaAudioLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() > 1 or name.endswith(".bias"):
            param.normal_(0.0, 0.02, generator=gen)  # make-checkpoint's init: norms stay at one
    model = model.eval().requires_grad_(False)
    model.setup_caches(num_slots, max_len)
    defaults = GenerationDefaults.from_dict(generation_config_dict(vocab))
    return LanguageModel(model, cfg, defaults, vocab, Path(f"<random {preset}>"))


def run_official(args, sh: dict, prompt: list[int]) -> dict:
    """The official code at batch 1 (boost), in its own interpreter with the carried transformers
    4.48.3 on PYTHONPATH (gpu_check.sh puts it there as OFFICIAL_PYTHONPATH)."""
    package = args.official_repo / "vita_audio/models/qwen2_mtp_v4_48_3"
    if not (package / "modeling_qwen2.py").exists():
        return {"skipped": f"no official model code at {package} (see benchmarks/README_gpu_check.md)"}
    with tempfile.TemporaryDirectory() as folder:
        raw = config_dict(sh["preset"])
        Path(folder, "config.json").write_text(json.dumps(raw))
        Path(folder, "generation_config.json").write_text(
            json.dumps(generation_config_dict(AudioVocab(raw["bos_token_id"]))))
        cmd = [sys.executable, str(HERE / "official_compare.py"), "--official-repo", str(args.official_repo),
               "--lm", folder, "--random-init", "--device", sh["device"],
               "--dtype", "bfloat16" if sh["dtype"] == torch.bfloat16 else "float32",
               "--modes", "boost", "--prompt-ids", ",".join(map(str, prompt)),
               "--max-new-tokens", str(sh["max_new_tokens"]), "--repeats", str(sh["lone_repeats"]), "--causal-fix"]
        env = {**os.environ, "PYTHONPATH": os.environ.get("OFFICIAL_PYTHONPATH", "")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.official_timeout_s)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    boost = json.loads(proc.stdout.strip().splitlines()[-1])["modes"]["boost"]
    if boost.get("error"):
        return {"error": boost["error"]}
    return {"first_chunk_ms": boost["first_chunk_ms"], "tokens_per_s": boost["tokens_per_s"],
            "transformers": json.loads(proc.stdout.strip().splitlines()[-1])["transformers"]}


def calls_per_gpu(lm: LanguageModel, sweep: tuple[int, ...], sh: dict) -> tuple[int | None, list[dict]]:
    """The largest batch of the sweep at which every call keeps >= 12.5 tokens/s after its first chunk
    (calls submitted together; each call's own rate, see bench_together)."""
    rows, best = [], None
    for batch in sweep:
        row = bench_engine(lm, batch, "boost", sh["prompt_len"], sh["max_new_tokens"], lone_repeats=1)
        rows.append({"batch": batch, "tokens_per_s": row["tokens_per_s"],
                     "per_call_tokens_per_s_min": row["per_call_tokens_per_s_min"],
                     "first_chunk_ms_max": row["first_chunk_ms_max"]})
        if row["every_call_real_time"]:
            best = batch
        else:
            break  # a larger batch only slows every call further
    return best, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny shapes")
    p.add_argument("--official-repo", type=Path, default=Path(".official"),
                   help="folder holding vita_audio/models/qwen2_mtp_v4_48_3 (carried, never committed)")
    p.add_argument("--official-timeout-s", type=float, default=240)
    p.add_argument("--skip-official", action="store_true")
    p.add_argument("--out", type=Path, help="write the JSON here (default: $OUT/gpu_check.json when $OUT is set)")
    args = p.parse_args(argv)
    sh = shapes(args.dry_run)
    if sh["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a machine without a GPU")
    t0 = time.perf_counter()
    lm = random_lm(sh["preset"], sh["device"], sh["dtype"], num_slots=max(sh["sweep"] + (sh["big"],)),
                   max_len=sh["max_len"])
    graphs = DecodeGraphs.attach(lm.model)
    build_s = time.perf_counter() - t0
    prompt = random_prompt(lm, sh["prompt_len"], random.Random(0))

    result = {"check": "gpu", "dry_run": args.dry_run, "preset": sh["preset"], "dtype": str(sh["dtype"]),
              "params": sum(x.numel() for x in lm.model.parameters()), "build_s": round(build_s, 2),
              **provenance(sh["device"]), "targets": TARGETS}
    result["batch1"] = bench_engine(lm, 1, "boost", sh["prompt_len"], sh["max_new_tokens"],
                                    lone_repeats=sh["lone_repeats"])
    result["together"] = bench_engine(lm, sh["big"], "boost", sh["prompt_len"], sh["max_new_tokens"], lone_repeats=1)
    result["joining"] = bench_engine(lm, sh["big"], "boost", sh["prompt_len"], sh["max_new_tokens"],
                                     arrival="staggered", joiners=sh["joiners"], lone_repeats=1)
    result["calls_per_gpu"], result["sweep"] = calls_per_gpu(lm, sh["sweep"], sh)
    result["official"] = {"skipped": "--skip-official"} if args.skip_official else run_official(args, sh, prompt)
    result["cuda_graphs"] = {"replays": graphs.replays, "graphs": len(graphs.graphs),
                             "static_eager_steps": graphs.eager_steps}
    if result["official"].get("tokens_per_s"):
        result["together_over_official_one_at_a_time"] = round(
            result["together"]["tokens_per_s"] / result["official"]["tokens_per_s"], 2)
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print_report(result, sh)
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if out:
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


def print_report(r: dict, sh: dict) -> None:
    def ok(value, limit, at_most=True):
        if value is None:
            return "-"
        return "MET" if (value <= limit if at_most else value >= limit) else "MISSED"

    b1, tog, join, off = r["batch1"], r["together"], r["joining"], r["official"]
    big = sh["big"]
    print(f"GPU check{' (DRY RUN: tiny shapes on the CPU)' if r['dry_run'] else ''}: {r['preset']} shapes, "
          f"{r['dtype']}, random weights; {r.get('gpu') or r['cpu_model']}, torch {r['torch']}, commit {r['commit']}")
    rows = [
        ("first chunk, batch 1 (ms)", b1["lone_first_chunk_ms"], off.get("first_chunk_ms"),
         f"<= {TARGETS['first_chunk_ms_batch1']:g}", ok(b1["lone_first_chunk_ms"], TARGETS["first_chunk_ms_batch1"])),
        ("tokens/s, batch 1", b1["lone_tokens_per_s"], off.get("tokens_per_s"),
         f">= {TARGETS['tokens_per_s_batch1']:g}", ok(b1["lone_tokens_per_s"], TARGETS["tokens_per_s_batch1"], False)),
        (f"first chunk, a call joining {big - 1} (ms, max)", join["joining_first_chunk_ms_max"], None,
         f"<= {TARGETS['first_chunk_ms_joining_63']:g}",
         ok(join["joining_first_chunk_ms_max"], TARGETS["first_chunk_ms_joining_63"])),
        (f"  its {big - 1} running calls: tokens/s each, min", join["running_tokens_per_s_min"], None,
         f">= {TOKENS_PER_SECOND}", ok(join["running_tokens_per_s_min"], TOKENS_PER_SECOND, False)),
        (f"tokens/s, {big} together (all)", tog["tokens_per_s"], off.get("tokens_per_s"),
         f"official one at a time: x{r.get('together_over_official_one_at_a_time', '-')}", ""),
        (f"first chunk, {big} together (ms, p50 / max)", f"{tog['first_chunk_ms_p50']} / {tog['first_chunk_ms_max']}",
         None, "", ""),
        ("calls per GPU (each >= 12.5 tokens/s)", r["calls_per_gpu"], None,
         f"sweep {','.join(str(s['batch']) for s in r['sweep'])}", ""),
    ]
    print(f"{'':46} {'ours':>16} {'official':>10}  {'target':<26} ")
    for name, ours, official, target, verdict in rows:
        print(f"{name:46} {ours!s:>16} {'-' if official is None else official!s:>10}  {target:<26} {verdict}")
    if "skipped" in off or "error" in off:
        print(f"official: {off.get('skipped') or off.get('error')}")
    g = r["cuda_graphs"]
    print(f"decode steps on the static path: {g['replays']} graph replays ({g['graphs']} graphs captured), "
          f"{g['static_eager_steps']} without a graph (the CPU's way); 0 and 0 would mean the runner sent no "
          f"step to model.decode_graphs")
    print("Triton on a GPU: not checked by this script.")
    print(f"elapsed {r['elapsed_s']} s")


if __name__ == "__main__":
    sys.exit(main())
