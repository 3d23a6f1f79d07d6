#!/usr/bin/env bash
# Create .venv at the repo root (once) and install into it the image's packages
# (services/prefect/requirements.lock, hash-checked), then the requirement sets given.
# usage: scripts/setup_venv.sh requirements/test.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# The image's packages first, hash-checked (services/prefect/requirements.lock): tests
# and local runs use the versions the image ships; the sets below add their tools.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
  -r services/prefect/requirements.lock
for req in "$@"; do
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
done
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
