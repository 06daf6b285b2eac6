"""Side by side: the OFFICIAL VITA-Audio code (HF `generate`) vs ours, same checkpoint, prompt, greedy.

Run in our venv; the official side runs in its own interpreter (transformers==4.48.3) through
benchmarks/official_compare.py:

    .venv/bin/python benchmarks/compare_report.py --lm /tmp/ck_mini/lm \\
        --official-repo /tmp/vita --official-python /tmp/offvenv/bin/python --out /tmp/compare_mini.json

For each mode it prints official vs ours: time to the 11th token (first chunk), ms per token and
tokens/s over the whole call (prefill included), the speed ratio official/ours, and whether the token
lists are identical (else the index of the first difference). The official code is run twice on CPU:
as is with sdpa (its multi-row forwards over a cache get a non-causal / mis-shaped mask there and MCTP
modes crash in the second chunk) and with official_compare.py --causal-fix (flash-attention
semantics, what the official code computes on its intended GPU path); tokens are compared with both.
Ours is timed in-process through the API (vitaserve.generator.generate), after one untimed warm-up
call, as official_compare.py does for the official side.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ["vanilla", "balance", "boost", "turbo"]
FIRST_CHUNK_TOKENS = 11
HERE = Path(__file__).resolve().parent


def random_prompt(seed: int, length: int, limit: int) -> list[int]:
    rng = random.Random(seed)  # same generator as official_compare.py
    return [rng.randrange(0, limit) for _ in range(length)]


def run_official(args, prompt: list[int], causal_fix: bool) -> dict:
    cmd = [args.official_python, str(HERE / "official_compare.py"), "--official-repo", str(args.official_repo),
           "--lm", str(args.lm), "--prompt-ids", ",".join(map(str, prompt)), "--modes", args.modes,
           "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats),
           "--attn", args.attn, "--stream-timing", args.stream_timing]
    if causal_fix:
        cmd.append("--causal-fix")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"official run failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_ours(args, prompt: list[int]):
    import torch

    from vitaserve.generator.generate import generate
    from vitaserve.generator.language_model import LanguageModel
    from vitaserve.lmtext.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = LanguageModel.from_folder(args.lm, device="cpu", dtype="float32",
                                   max_len=len(prompt) + args.max_new_tokens + 16)
    load_s = time.perf_counter() - t0
    sampling = SamplingParams.from_defaults(lm.defaults, do_sample=False)

    def once(mode, n):
        events = list(generate(lm, prompt, mode, sampling, n, stop_ids=()))
        return [e.token_id for e in events], [e.elapsed_s * 1000 for e in events]

    if args.warmup_tokens:
        once("vanilla", args.warmup_tokens)
    return once, {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
                  "repetition_penalty": sampling.repetition_penalty,
                  "schedules": {m: list(lm.schedule(m).pairs) for m in args.modes.split(",")}}


def run_ours(args, once, info) -> dict:
    out = {"impl": "ours", **{k: v for k, v in info.items() if k != "schedules"}, "modes": {}}
    for name in args.modes.split(","):
        runs = sorted((once(name, args.max_new_tokens) for _ in range(max(1, args.repeats))),
                      key=lambda r: r[1][-1])
        tokens, token_ms = runs[len(runs) // 2]
        n = len(tokens)
        entry = {
            "tokens": tokens, "token_ms": [round(x, 3) for x in token_ms],
            "first_chunk_ms": round(token_ms[FIRST_CHUNK_TOKENS - 1], 3) if n >= FIRST_CHUNK_TOKENS else None,
            "ms_per_token": round(token_ms[-1] / n, 3), "tokens_per_s": round(n / token_ms[-1] * 1000, 2),
            "mode": info["schedules"][name],
        }
        entry["first_chunk_ms_all"] = [round(r[1][FIRST_CHUNK_TOKENS - 1], 3) for r in runs]
        entry["total_ms_all"] = [round(r[1][-1], 3) for r in runs]
        entry["tokens_all_same"] = all(r[0] == tokens for r in runs)
        out["modes"][name] = entry
        print(f"[ours] {name}: first chunk {entry['first_chunk_ms']} ms, {entry['ms_per_token']} ms/token",
              file=sys.stderr)
    return out


def merge_rounds(results: list[dict]) -> dict:
    """Per mode: the median/min over every timed run of every round (rounds alternate official and ours,
    so a burst of other load on the shared machine hits both sides alike); tokens must agree."""
    merged = dict(results[0])
    merged["rounds"] = len(results)
    merged["modes"] = {}
    for name, first in results[0]["modes"].items():
        entries = [r["modes"][name] for r in results]
        n = len(first["tokens"])
        totals = [t for e in entries for t in e.get("total_ms_all") or [e["token_ms"][-1]]]
        firsts = [t for e in entries for t in e.get("first_chunk_ms_all") or [e["first_chunk_ms"]] if t is not None]
        entry = dict(first)
        entry["total_ms_all"], entry["first_chunk_ms_all"] = totals, firsts
        entry["first_chunk_ms"] = round(statistics.median(firsts), 3) if firsts else None
        entry["ms_per_token"] = round(statistics.median(totals) / n, 3)
        entry["tokens_per_s"] = round(n / statistics.median(totals) * 1000, 2)
        entry["tokens_same_every_round"] = all(e["tokens"] == first["tokens"] for e in entries)
        merged["modes"][name] = entry
    return merged


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(official: dict, official_asis: dict | None, ours: dict) -> list[dict]:
    rows = []
    for name, o in official["modes"].items():
        u = ours["modes"][name]
        diff = first_difference(o["tokens"], u["tokens"])
        row = {
            "mode": name,
            "official_first_chunk_ms": o["first_chunk_ms"], "ours_first_chunk_ms": u["first_chunk_ms"],
            "official_ms_per_token": o["ms_per_token"], "ours_ms_per_token": u["ms_per_token"],
            "official_tokens_per_s": o["tokens_per_s"], "ours_tokens_per_s": u["tokens_per_s"],
            "speed_ratio_per_token": round(o["ms_per_token"] / u["ms_per_token"], 2),
            "speed_ratio_first_chunk": (round(o["first_chunk_ms"] / u["first_chunk_ms"], 2)
                                        if o["first_chunk_ms"] and u["first_chunk_ms"] else None),
            "tokens_identical": diff is None, "first_difference": diff,
            "tokens_stable": o.get("tokens_same_every_round", True) and u.get("tokens_same_every_round", True)
                             and u.get("tokens_all_same", True),
        }
        if len(o.get("total_ms_all") or []) > 1 and len(u.get("total_ms_all") or []) > 1:  # best of the repeats: least disturbed by other load
            n_o, n_u = len(o["tokens"]), len(u["tokens"])
            row["official_ms_per_token_min"] = round(min(o["total_ms_all"]) / n_o, 3)
            row["ours_ms_per_token_min"] = round(min(u["total_ms_all"]) / n_u, 3)
            row["official_first_chunk_ms_min"] = min(o["first_chunk_ms_all"])
            row["ours_first_chunk_ms_min"] = min(u["first_chunk_ms_all"])
            row["speed_ratio_per_token_min"] = round(row["official_ms_per_token_min"] / row["ours_ms_per_token_min"], 2)
            row["speed_ratio_first_chunk_min"] = round(row["official_first_chunk_ms_min"] / row["ours_first_chunk_ms_min"], 2)
        if official_asis is not None:
            a = official_asis["modes"][name]
            row["asis_tokens"] = len(a["tokens"])
            row["asis_error"] = a["error"]["message"] if a["error"] else None
            row["asis_prefix_identical_to_ours"] = a["tokens"] == u["tokens"][: len(a["tokens"])]
            row["asis_ms_per_token"] = a["ms_per_token"]
            row["asis_first_chunk_ms"] = a["first_chunk_ms"]
        rows.append(row)
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    head = (f"{'mode':8} | {'first chunk ms off/ours':>24} | {'ms/token off/ours':>18} | {'tok/s off/ours':>16} | "
            f"{'x/token':>7} | {'x/1st':>6} | tokens (vs official+causal-fix) | official sdpa as is")
    print(head)
    print("-" * len(head))
    for r in rows:
        same = "identical" if r["tokens_identical"] else f"differ at {r['first_difference']}"
        asis = ""
        if "asis_tokens" in r:
            asis = (f"{r['asis_tokens']} tokens, " + ("crash" if r["asis_error"] else "ok") +
                    (", prefix = ours" if r["asis_prefix_identical_to_ours"] else ", prefix differs"))
        print(f"{r['mode']:8} | {str(r['official_first_chunk_ms']):>11} / {str(r['ours_first_chunk_ms']):>10} | "
              f"{r['official_ms_per_token']:>8} / {r['ours_ms_per_token']:>7} | "
              f"{r['official_tokens_per_s']:>7} / {r['ours_tokens_per_s']:>6} | {r['speed_ratio_per_token']:>7} | "
              f"{str(r['speed_ratio_first_chunk']):>6} | {same:31} | {asis}")
    if rows and "official_ms_per_token_min" in rows[0]:
        print("best of the repeats (min):")
        for r in rows:
            print(f"{r['mode']:8} | {r['official_first_chunk_ms_min']:>11} / {r['ours_first_chunk_ms_min']:>10} | "
                  f"{r['official_ms_per_token_min']:>8} / {r['ours_ms_per_token_min']:>7} | "
                  f"{round(1000 / r['official_ms_per_token_min'], 2):>7} / {round(1000 / r['ours_ms_per_token_min'], 2):>6} | "
                  f"{r['speed_ratio_per_token_min']:>7} | {r['speed_ratio_first_chunk_min']:>6} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", required=True, type=Path)
    p.add_argument("--official-repo", type=Path, default=Path("/tmp/vita"))
    p.add_argument("--official-python", default="/tmp/offvenv/bin/python")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode and side; the median total is kept")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate official and ours this many times; statistics pool every run of every round")
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="official attention backend")
    p.add_argument("--stream-timing", choices=["put", "thread"], default="put")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-asis", action="store_true", help="do not run the unpatched official code")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    cfg = json.loads((args.lm / "config.json").read_text())
    limit = min(151643, cfg.get("bos_token_id") or cfg["vocab_size"])
    prompt = random_prompt(args.seed, args.prompt_len, limit)

    official_asis = None if args.skip_asis else run_official(args, prompt, causal_fix=False)
    once, info = load_ours(args, prompt)
    official_rounds, ours_rounds = [], []
    for _ in range(max(1, args.rounds)):
        official_rounds.append(run_official(args, prompt, causal_fix=True))
        ours_rounds.append(run_ours(args, once, info))
    official, ours = merge_rounds(official_rounds), merge_rounds(ours_rounds)
    rows = compare(official, official_asis, ours)
    report = {"lm": str(args.lm), "prompt": prompt, "max_new_tokens": args.max_new_tokens,
              "repeats": args.repeats, "rows": rows, "official_causal_fix": official,
              "official_asis": official_asis, "ours": ours}
    print_table(rows, f"median of {args.rounds} x {args.repeats} run(s); {args.lm} ({cfg['hidden_size']} hidden, vocab {cfg['vocab_size']}), "
                      f"{args.prompt_len}-token prompt, {args.max_new_tokens} new tokens, greedy, rep. penalty "
                      f"{ours['repetition_penalty']}, official attn={args.attn}; x = official time / ours")
    if args.out:
        args.out.write_text(json.dumps(report))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
