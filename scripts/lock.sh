#!/usr/bin/env bash
# Rewrite services/prefect/requirements.lock: every package the image installs, its
# version and the sha256 of each of its files on PyPI, resolved from
# services/prefect/requirements.txt (the pins people edit) for the image's Python 3.11
# on Linux. Run after changing requirements.txt; the Dockerfile and the test venv
# install the lock with --require-hashes, so a stale or incomplete lock fails there.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet --disable-pip-version-check -r requirements/lock.txt
# No index or find-links lines: this machine's mirrors are not the image's.
"$tools/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
  --annotation-style line --no-header \
  --output-file services/prefect/requirements.lock services/prefect/requirements.txt
