# shellcheck shell=sh
# The docker runtime's steps: the engine from the distribution, then the image.
# Part of every VM's boot.sh (bootscript.render_script), from the next line on.
docker_engine() {
  if command -v docker >/dev/null 2>&1; then
    echo "already installed: $(docker --version)"
  else
    # With AppArmor on in the kernel, docker refuses to run a container unless it can
    # load its profile, and apparmor is only a Recommends of docker.io.
    set -- docker.io
    if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ] &&
      ! command -v apparmor_parser >/dev/null 2>&1; then
      set -- "$@" apparmor
    fi
    apt_install "$@" || return 1
  fi
  if [ -z "$LOCAL" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl start docker || return 1
  fi
  n=0
  until docker info >/dev/null 2>&1; do
    n=$((n + 1))
    if [ "$n" -gt 60 ]; then docker info; return 1; fi
    sleep 1
  done
}
pull() {
  n=1
  until docker pull -q "$IMAGE" >"$D/log/pull.out" 2>&1; do
    cat "$D/log/pull.out"
    # A tag the registry does not have will not appear by retrying.
    if grep -qiE 'manifest unknown|not found|does not exist' "$D/log/pull.out"; then
      echo "the image $IMAGE does not exist: set docker_image to an image that does,"
      echo "or runtime='native' to install this client's dask on the VM"
      return 1
    fi
    if [ "$n" -ge 6 ]; then echo "giving up after $n attempts"; return 1; fi
    if past_deadline; then echo "giving up after $n attempts: boot deadline reached"; return 1; fi
    echo "attempt $n failed; retrying in $((n * 5))s"
    sleep $((n * 5)); n=$((n + 1))
  done
  cat "$D/log/pull.out"
}
# What an image built for this script holds (common.sh: provisioned).
software() { echo "docker $IMAGE"; }
# On such an image: its engine answers (it starts with the VM) and has the image.
as_built() {
  n=0
  until docker info >/dev/null 2>&1; do
    n=$((n + 1))
    if [ "$n" -gt 60 ]; then return 1; fi
    sleep 1
  done
  [ -n "$LOCAL" ] || docker image inspect "$IMAGE" >/dev/null 2>&1
}
