#!/usr/bin/env bash
# Fill the two ignored folders that benchmarks/gpu_check.sh carries to a GPU machine without network:
#   .whl/       transformers 4.48.3 (the official code's pin), tokenizers 0.21, huggingface_hub < 1,
#               as CPython 3.12 manylinux wheels (the GPU image's Python; PY_VERSION overrides)
#   .official/  vita_audio/models/qwen2_mtp_v4_48_3 copied from a VITA-Audio checkout (a work tree,
#               or a git directory such as a mirror: read with git archive). Never committed.
# Usage: bash benchmarks/gpu_check_prepare.sh /path/to/VITA-Audio
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: gpu_check_prepare.sh VITA-AUDIO-CHECKOUT}"
pkg=vita_audio/models/qwen2_mtp_v4_48_3
PY="${PYTHON:-python3}"
mkdir -p .whl .official
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "transformers==4.48.3" "tokenizers>=0.21,<0.22" "huggingface_hub>=0.24,<1.0"
if [ -d "$src/$pkg" ]; then
  mkdir -p ".official/$pkg" && cp "$src/$pkg"/*.py ".official/$pkg/"
else
  git --git-dir="$src" archive HEAD "$pkg" | tar -x -C .official
fi
ls .whl ".official/$pkg"
