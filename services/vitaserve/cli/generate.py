"""`vita-audio generate`: offline token generation from a checkpoint folder, no services."""

from __future__ import annotations


from vitaserve.generator.lm_options import LMLoadError, LMOptions

FIRST_CHUNK_TOKENS = 11  # one backbone token + a 10-token audio chunk


def parse_ids(text: str) -> list[int]:
    from vitaserve.cli.main import CLIError

    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CLIError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate tokens offline from a checkpoint (no services)",
        description=(
            "Run VITA-Audio generation on a checkpoint folder and print the new tokens. With --prompt-ids "
            "only config.json, generation_config.json and the weights are needed; --tts-text builds the "
            "official text-to-speech prompt with the folder's tokenizer. Sampling follows the folder's "
            "generation_config.json unless --greedy or explicit values are given (the repetition penalty "
            "applies to greedy decoding too, as in the official code)."
        ),
    )
    LMOptions.add_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    src.add_argument("--tts-text", help="text to speak, wrapped in the official TTS prompt")
    p.add_argument("--mode", default=None,
                   help="vanilla, balance, boost, turbo or a list like 1,10,4,10 (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (do_sample false)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="seed of this call's sampler")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end ids")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    import json

    from vitaserve.cli.main import CLIError
    from vitaserve.generator.generate import generate
    from vitaserve.lmtext.sampling_params import SamplingParams

    try:
        lm = LMOptions.from_args(args).load()
    except LMLoadError as exc:
        raise CLIError(str(exc)) from exc
    tokenizer = None
    if args.tts_text is not None:
        from vitaserve.lmtext.prompt import PromptBuilder
        from vitaserve.lmtext.text_tokenizer import load_text_tokenizer

        try:
            tokenizer = load_text_tokenizer(args.lm)
            prompt = PromptBuilder(tokenizer).tts(args.tts_text)
        except (FileNotFoundError, ValueError) as exc:
            raise CLIError(str(exc)) from exc
    else:
        prompt = parse_ids(args.prompt_ids)
    try:
        sampling = SamplingParams.from_defaults(
            lm.defaults, do_sample=False if args.greedy else None, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        )
        events = list(generate(lm, prompt, args.mode, sampling, args.max_new_tokens,
                               stop_ids=() if args.ignore_eos else None))
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    token_ms = [round(e.elapsed_s * 1000, 3) for e in events]
    result = {
        "tokens": [e.token_id for e in events],
        "is_audio": [e.is_audio for e in events],
        "audio_tokens": [lm.vocab.audio_index(e.token_id) for e in events if e.is_audio],
        "kinds": "".join(e.kind for e in events),
        "token_ms": token_ms,
        "tokens_per_s": round(len(events) / events[-1].elapsed_s, 2),
        "first_chunk_ms": token_ms[FIRST_CHUNK_TOKENS - 1] if len(events) >= FIRST_CHUNK_TOKENS else None,
        "mode": list(lm.schedule(args.mode).pairs),
        "prompt_len": len(prompt),
    }
    if tokenizer is not None:
        from vitaserve.lmtext.detokenize import TextStream

        stream = TextStream(tokenizer, lm.vocab.endoftext_id)
        result["text"] = "".join(stream.push(t) for t in result["tokens"]) + stream.flush()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(events)} tokens ({result['kinds']}), {result['tokens_per_s']} tokens/s, "
              f"first chunk {result['first_chunk_ms']} ms")
        print(",".join(map(str, result["tokens"])))
    return 0
