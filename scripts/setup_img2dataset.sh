#!/usr/bin/env bash
# Set up .venv-img2dataset (idempotent; re-runs when this script changes): img2dataset in a virtualenv of its own,
# used by tests/test_img2dataset.py to make a real img2dataset output. It cannot share .venv: img2dataset 1.47
# pins webdataset<0.3 and pandas<3. This script never touches .venv.
#
# Running img2dataset offline needs two environment variables (the test sets them):
#   NO_ALBUMENTATIONS_UPDATE=1  albumentations, imported by img2dataset, otherwise asks PyPI for a newer
#                               version at import, in every process (2 s timeout each when offline)
#   WANDB_MODE=disabled         belt and braces: img2dataset imports wandb even with --enable_wandb False
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-img2dataset}
PY=${PYTHON:-python3}
SPEC=${IMG2DATASET_SPEC:-img2dataset==1.47.0}
if [ ! -x "$VENV/bin/img2dataset" ] || [ ! -f "$VENV/.installed" ] || [ scripts/setup_img2dataset.sh -nt "$VENV/.installed" ] \
    || [ "$(cat "$VENV/.installed")" != "$SPEC" ]; then
  "$PY" -m venv "$VENV"
  # The venv's own pip is recent enough for img2dataset's wheels; not upgrading it saves a download.
  "$VENV/bin/pip" install -q --disable-pip-version-check "$SPEC"
  NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled "$VENV/bin/python" -c "import img2dataset"
  echo "$SPEC" > "$VENV/.installed"
fi
