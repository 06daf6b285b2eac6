"""The engine beside the official code in one run on one machine: one call, N calls together, and a
call joining N-1 running calls (issue 15's table). Run in our venv; the official side runs in its
own interpreter with transformers 4.48.3 through official_compare.py:

    .venv/bin/python benchmarks/engine_compare.py --lm /tmp/ck_mini/lm --official-repo /tmp/vita \\
        --official-python /tmp/offvenv/bin/python --out benchmarks/results/engine_compare_mini_cpu.json

(--official-pythonpath DIR instead puts a folder of those packages, e.g. one installed from
gpu_check_prepare.sh's wheels, on the official side's PYTHONPATH.) The official side runs first and
last, one call at a time (HF `generate` has no continuous batching: N calls take N times one call),
and the two official runs are pooled, so a burst of other load on a shared machine is seen by both
sides. All figures are greedy, boost by default, on the same prompt length; the lone call's prompt is
the official one's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_official(args, prompt: list[int]) -> dict:
    cmd = [args.official_python, str(HERE / "official_compare.py"), "--official-repo", str(args.official_repo),
           "--lm", str(args.lm), "--prompt-ids", ",".join(map(str, prompt)), "--modes", args.mode,
           "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats), "--causal-fix"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.official_pythonpath:
        env["PYTHONPATH"] = args.official_pythonpath
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    sys.stderr.write(proc.stderr[-2000:])
    if proc.returncode != 0:
        raise SystemExit(f"official run failed ({proc.returncode})")
    entry = json.loads(proc.stdout.strip().splitlines()[-1])["modes"][args.mode]
    if entry.get("error"):
        raise SystemExit(f"official run failed: {entry['error']}")
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", required=True, type=Path)
    p.add_argument("--official-repo", required=True, type=Path)
    p.add_argument("--official-python", default=sys.executable)
    p.add_argument("--official-pythonpath", help="PYTHONPATH of the official side (its transformers 4.48.3)")
    p.add_argument("--mode", default="boost")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--joiners", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import torch

    from vitaserve.common.provenance import provenance
    from vitaserve.generator.benchmark import bench_engine
    from vitaserve.generator.language_model import LanguageModel

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads((args.lm / "config.json").read_text())
    rng = random.Random(args.seed)
    prompt = [rng.randrange(min(151643, cfg.get("bos_token_id") or cfg["vocab_size"])) for _ in range(args.prompt_len)]

    official = [run_official(args, prompt)]
    lm = LanguageModel.from_folder(args.lm, num_slots=args.concurrency, max_len=1024)
    together = bench_engine(lm, args.concurrency, args.mode, args.prompt_len, args.max_new_tokens, seed=args.seed,
                            lone_repeats=args.repeats)
    staggered = bench_engine(lm, args.concurrency, args.mode, args.prompt_len, args.max_new_tokens, seed=args.seed,
                             arrival="staggered", joiners=args.joiners, lone_repeats=args.repeats)
    official.append(run_official(args, prompt))
    off_first = statistics.median(x for o in official for x in (o.get("first_chunk_ms_all") or [o["first_chunk_ms"]]))
    off_total = statistics.median(x for o in official for x in (o.get("total_ms_all") or [o["token_ms"][-1]]))
    off_tps = len(official[0]["tokens"]) / off_total * 1000
    lone_first = round(statistics.median([together["lone_first_chunk_ms"], staggered["lone_first_chunk_ms"]]), 1)
    lone_tps = round(statistics.median([together["lone_tokens_per_s"], staggered["lone_tokens_per_s"]]), 2)
    n = args.concurrency
    rows = [
        (f"first chunk (11th token), one call, {args.mode} (ms)", round(off_first, 1), lone_first,
         f"{off_first / lone_first:.2f}x"),
        ("tokens/s, one call", round(off_tps, 2), lone_tps, f"{lone_tps / off_tps:.2f}x"),
        (f"{n} calls together: tokens/s in all", f"{off_tps:.2f} (one at a time)", together["tokens_per_s"],
         f"{together['tokens_per_s'] / off_tps:.2f}x"),
        (f"first chunk, {n} together (p50 / max) vs alone (ms)", "-",
         f"{together['first_chunk_ms_p50']} / {together['first_chunk_ms_max']} vs {together['lone_first_chunk_ms']}",
         f"max {together['first_chunk_max_over_lone']}x"),
        (f"first chunk, a call joining {n - 1} (p50 / max) vs alone (ms)", "-",
         f"{staggered['joining_first_chunk_ms_p50']} / {staggered['joining_first_chunk_ms_max']} vs "
         f"{staggered['lone_first_chunk_ms']}",
         f"p50 {staggered['joining_first_chunk_p50_over_lone']}x, max {staggered['joining_first_chunk_max_over_lone']}x"),
        (f"its {n - 1} running calls: tokens/s each (min) vs 12.5", "-", staggered["running_tokens_per_s_min"],
         "real time" if staggered["running_keep_real_time"] else "BELOW real time"),
    ]
    prov = provenance("cpu")
    print(f"\n{prov['cpu_model']}, {prov['torch_threads']} torch threads, torch {prov['torch']}, commit {prov['commit']}; "
          f"{args.lm}, {args.prompt_len}-token prompt, {args.max_new_tokens} tokens, greedy")
    print(f"{'':58} | {'official':>22} | {'this project':>42} | ratio")
    for name, off, ours, ratio in rows:
        print(f"{name:58} | {off!s:>22} | {ours!s:>42} | {ratio}")
    if args.out:
        args.out.write_text(json.dumps({**prov, "lm": str(args.lm), "mode": args.mode, "prompt": prompt,
                                        "official_first_chunk_ms": off_first, "official_tokens_per_s": off_tps,
                                        "official_runs": official, "together": together, "staggered": staggered,
                                        "table": [dict(zip(("row", "official", "ours", "ratio"), r)) for r in rows]},
                                       indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
