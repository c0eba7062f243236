#!/usr/bin/env bash
# Install what the tests need on a fresh machine (Python, pip and apt), then run them all:
# lint, the docs build (warnings are errors) and the full test suite, slow tests included
# (guests under QEMU too: their images are cached by input hash outside the clone, in
# $DSC_TEST_CACHE or ~/.cache/dask-secure-cloud-tests).
#
# The Python environment is the one whose `python3` (else `python`) is on PATH, or the
# interpreter named by $PYTHON: PYTHON=/path/to/venv/bin/python bash ci/test.sh tests a
# virtualenv that is not activated. Its packages are upgraded to the newest releases the
# requirements allow, which is what a new user gets.
set -euo pipefail
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# cloud-init: only its `cloud-init schema` validator is used; it must never configure this
# machine. shellcheck: lints the rendered boot scripts. The rest is the guest test bed:
# QEMU, the image builder (mmdebstrap, mke2fs), the NoCloud seed (genisoimage), the
# namespace's network (iproute2) and the guests' apt mirror (apt-ftparchive). chromium and
# chromium-driver: the JupyterLab sidebar's test in a real, headless browser.
PACKAGES="cloud-init shellcheck qemu-system-x86 qemu-utils mmdebstrap genisoimage e2fsprogs iproute2 apt-utils chromium chromium-driver"
missing=""
for package in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing="$missing $package"
done
if [ -n "$missing" ]; then
  as_root mkdir -p /etc/cloud
  [ -e /etc/cloud/cloud-init.disabled ] || as_root touch /etc/cloud/cloud-init.disabled
  as_root apt-get update -qq
  # shellcheck disable=SC2086
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Installed as a user installs it (not editable): `pip install .` also puts the package's
# dask config (etc/dask: the security loader) into the environment, and the tests that
# start Jupyter servers and kernels use what it installed.
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q --upgrade --upgrade-strategy eager ".[test]"

"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
"$PYTHON" -m sphinx -W --keep-going -q -b html docs docs/_build/html
# The guest tests are the only proof of the boot path: here a machine that cannot host
# them fails the run rather than skipping them (DSC_REQUIRE_GUESTS=0 to skip instead).
# Three pytest workers, one per group of tests (see tests/conftest.py): the guests, the
# process-VM tests, and the long, light tests marked "alongside".
DSC_REQUIRE_GUESTS="${DSC_REQUIRE_GUESTS:-1}" "$PYTHON" -m pytest -ra --durations=25 \
  -n 3 --dist loadgroup "$@"
