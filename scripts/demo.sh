#!/usr/bin/env bash
# The main job on the embedded default: set up, start the local cluster (Redis, Triton, encoder,
# decoder, gateway on localhost, tiny checkpoints generated on first use), make one phone-like call
# (mu-law 8 kHz, real time) with a spoken question, write answer.wav, stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
espeak-ng -w out/question.wav "Hello! What is the weather like in Paris today?"
exec .venv/bin/vita-audio up --call out/question.wav --out answer.wav --codec mulaw --rate 8000 --max-new-tokens 300 "$@"
