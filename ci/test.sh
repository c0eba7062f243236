#!/usr/bin/env bash
# Install what the tests need on a fresh machine (Python, pip and apt), then run them all:
# lint, the docs build (warnings are errors) and the full test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v cloud-init >/dev/null; then
  # Only its `cloud-init schema` validator is used; it must never configure this machine.
  as_root mkdir -p /etc/cloud
  as_root touch /etc/cloud/cloud-init.disabled
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cloud-init >/dev/null
fi

python -m pip install -q -e ".[test]"

ruff check .
ruff format --check .
python -m sphinx -W --keep-going -q -b html docs docs/_build/html
python -m pytest -ra "$@"
