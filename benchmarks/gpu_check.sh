#!/usr/bin/env bash
# GPU check of the engine (issue 15), for a GPU machine as it comes: another Python and torch, no
# network. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh            # the 7B shapes on cuda, under 5 minutes
#   bash benchmarks/gpu_check.sh --dry-run  # the same code, tiny shapes on the CPU (the suite runs it)
#
# The package runs from the checkout (PYTHONPATH=services). Two ignored folders travel beside it,
# never committed (benchmarks/README_gpu_check.md says how to fill them):
#   .whl/       wheels the official side needs and the machine lacks (transformers 4.48.3,
#               tokenizers 0.21, huggingface_hub < 1): installed into /tmp/site and put on the
#               PYTHONPATH of the official side only, so our side runs on the machine's own packages
#   .official/  vita_audio/models/qwen2_mtp_v4_48_3 of the official VITA-Audio repository
# Without them the official side is reported as skipped. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/services${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OFFICIAL_PYTHONPATH="${OFFICIAL_PYTHONPATH:+$OFFICIAL_PYTHONPATH:}$PWD/benchmarks"
if compgen -G ".whl/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/vita_official_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  OFFICIAL_PYTHONPATH="$site:$OFFICIAL_PYTHONPATH"
fi
export OFFICIAL_PYTHONPATH
exec "$PY" benchmarks/gpu_check.py "$@"
