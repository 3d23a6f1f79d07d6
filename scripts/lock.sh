#!/usr/bin/env bash
# Rewrite services/prefect/requirements.lock: every package the image installs, its
# version and the sha256 of each of its files on PyPI, resolved from
# services/prefect/requirements.txt (the pins people edit). Run after changing
# requirements.txt. An incomplete lock fails the image's (and the test venv's)
# --require-hashes install; a stale one, whose pins requirements.txt no longer has,
# fails tests/test_static_stack.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip-compile resolves for the interpreter it runs on: the image's Python 3.11.
PYTHON=${PYTHON:-python3.11}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "scripts/lock.sh needs Python 3.11, as the image: set PYTHON" >&2; exit 1; }
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
"$PYTHON" -m venv "$tools"
"$tools/bin/pip" install --quiet --disable-pip-version-check -r requirements/lock.txt
# No index or find-links lines: this machine's mirrors are not the image's.
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/bin/pip-compile" --quiet \
  --generate-hashes --strip-extras --allow-unsafe \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host --annotation-style line \
  --output-file services/prefect/requirements.lock services/prefect/requirements.txt
