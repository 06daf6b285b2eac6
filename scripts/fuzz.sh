#!/usr/bin/env bash
# A full fuzzing run (tests/test_fuzz.py): --examples inputs (default 10000) spread over Converse,
# Synthesize, Transcribe, Encode and the decoder's DecodeBlock/EndStream, against real servers on
# loopback, with a healthy call beside them. Prints the seed first; --seed S replays a run.
# Further arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
examples=10000
seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
while [ $# -gt 0 ]; do
  case "$1" in
    --examples) examples=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    *) break ;;
  esac
done
echo "fuzz seed: $seed  (replay: scripts/fuzz.sh --examples $examples --seed $seed)"
VITA_FUZZ_EXAMPLES=$examples exec .venv/bin/python -m pytest -q -p no:cacheprovider -s tests/test_fuzz.py \
  -k "test_fuzz_" --hypothesis-seed="$seed" "$@"
