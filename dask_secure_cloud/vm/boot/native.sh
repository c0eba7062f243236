# shellcheck shell=sh
# The native runtime's step: this client's exact dask and distributed, pip_packages and
# requirements_file.
# Part of every VM's boot.sh (bootscript.render_script), from the next line on.
has_wanted_dask() {
  "$1" - "$WANT_DASK" "$WANT_DISTRIBUTED" <<'PY' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    have = (version("dask"), version("distributed"))
except PackageNotFoundError:
    sys.exit(1)
want = tuple(sys.argv[1:3])
sys.exit(0 if all(w in ("", h) for w, h in zip(want, have)) else 1)
PY
}
# What the user asked for beyond dask: requirements.txt (pip_packages, one a line),
# requirements-file.txt or requirements.lock (requirements_file, read by pip itself).
wants_more() {
  [ -e "$D/requirements.txt" ] || [ -e "$D/requirements-file.txt" ] ||
    [ -e "$D/requirements.lock" ]
}
# When $1 is itself a virtualenv's interpreter, --system-site-packages shows only its
# base interpreter's packages: the new environment also gets $1's (after its own), so
# what that environment has (dask, on a local VM: the client's) is not installed again.
keep_packages_of() {
  "$1" - "$D/venv/bin/python" <<'PY'
import site, subprocess, sys
if sys.prefix != sys.base_prefix:
    ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
    own = subprocess.run([sys.argv[1], "-c", ask], capture_output=True, text=True, check=True)
    own = own.stdout.strip()
    parents = [d for d in site.getsitepackages() if d != own]  # never itself: a loop
    with open(f"{own}/dask-secure-cloud-parent.pth", "w") as pth:
        pth.writelines(f"import site; site.addsitedir({ascii(d)})\n" for d in parents)
PY
}
python_env() {
  if ! wants_more && has_wanted_dask "$PY"; then
    echo "$PY already has dask ${WANT_DASK:-(any)} and distributed ${WANT_DISTRIBUTED:-(any)}"
    return 0
  fi
  if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Ubuntu's and Debian's cloud images ship python3 without venv.
    apt_install python3-venv || return 1
  fi
  if [ ! -x "$D/venv/bin/python" ]; then
    # System site-packages stay visible: whatever the image has baked in is kept.
    "$PY" -m venv --system-site-packages "$D/venv" || return 1
  fi
  keep_packages_of "$PY" || return 1
  if [ -e "$D/requirements.lock" ]; then
    # Hash-checked: pip installs nothing the file does not pin and hash, dask included
    # (the client checked that it pins dask and distributed at its own versions).
    set -- --require-hashes -r "$D/requirements.lock"
  else
    # A development build's local version (+g1234) is not on an index: pin its release.
    set -- "dask${WANT_DASK:+==${WANT_DASK%%+*}}" \
      "distributed${WANT_DISTRIBUTED:+==${WANT_DISTRIBUTED%%+*}}"
    # pip_packages, one requirement a line: each line is one argument, never split,
    # expanded or parsed by this shell (nor by pip's requirements-file syntax).
    if [ -e "$D/requirements.txt" ]; then
      while IFS= read -r req || [ -n "$req" ]; do set -- "$@" "$req"; done <"$D/requirements.txt"
    fi
    if [ -e "$D/requirements-file.txt" ]; then set -- "$@" -r "$D/requirements-file.txt"; fi
  fi
  retry "$D/venv/bin/python" -m pip install -q --disable-pip-version-check \
    --retries 3 --timeout 30 "$@" || return 1
  "$D/venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
    grep -iE '^(dask|distributed) '
  PY="$D/venv/bin/python"
}
# What an image built for this script holds (common.sh: provisioned).
software() {
  echo "native dask ${WANT_DASK:-(any)} distributed ${WANT_DISTRIBUTED:-(any)}"
  # Their digests, not their lines: an index's credentials in them would otherwise be
  # on every console and in the image's record.
  for f in requirements.txt requirements-file.txt requirements.lock; do
    if [ -e "$D/$f" ]; then echo "$f $(sha256sum <"$D/$f" | cut -c1-16)"; fi
  done
}
# On such an image: its environment (the virtualenv the build made, if any) has them.
as_built() {
  if [ -x "$D/venv/bin/python" ]; then PY="$D/venv/bin/python"; fi
  has_wanted_dask "$PY"
}
