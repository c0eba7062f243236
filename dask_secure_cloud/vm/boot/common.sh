# shellcheck shell=sh
# Functions every boot script has: say, clock, since, the step runner, power_off.
# Part of every VM's boot.sh (bootscript.render_script), from the next line on.
say() { echo "dask-secure-cloud: $*"; }
clock() {
  if [ -r /proc/uptime ]; then read -r up _ </proc/uptime; echo "$up"; else date +%s; fi
}
since() { awk -v a="$1" -v b="$(clock)" 'BEGIN { printf "%.1f", b - a }'; }
past_deadline() { [ "$(date +%s)" -ge "$DEADLINE" ]; }
power_off() {
  [ -n "$LOCAL" ] && return 0
  shutdown -h "$1" >/dev/null 2>&1 || poweroff
}
on_exit() {
  rc=$?
  [ "$rc" -eq 0 ] && return
  # A failed boot ends the enrollment still waiting (it may have ended already), and
  # the Dask process waiting for it.
  if [ -n "${ENROLL:-}" ]; then kill "$ENROLL" 2>/dev/null || true; fi
  { : >"$D/boot-failed"; } 2>/dev/null || true
  say "boot FAILED at step $STEP (exit $rc) after $(since "$T0")s"
  if [ -e "$D/image-build" ]; then
    # A failed image builder stays on until its client deletes it: a client that cannot
    # read consoles (DigitalOcean) tells it so from a builder that finished and is off.
    hold=$((DEADLINE - $(date +%s) + 600))
    say "the image builder stays on until deleted (at most ${hold}s)"
    (sleep "$hold"; power_off now) &
  # A short grace keeps the console readable for whoever is attached to it.
  elif [ -z "$LOCAL" ]; then say "powering off in 30s"; (sleep 30; power_off now) & fi
}
# provisioned: whether this VM's image was built (`dask secure-cloud image build`) with
# just what this script would provision (the runtime's `software`) and is ready as built
# (`as_built`): then the provisioning steps are skipped.
provisioned() {
  [ -r "$LOCAL/var/lib/dask-secure-cloud/provisioned" ] || return 1
  [ "$(cat "$LOCAL/var/lib/dask-secure-cloud/provisioned")" = "$(software)" ] || return 1
  as_built || return 1
  say "provisioned: the image has $(software | tr '\n' ' ')"
}
# step NAME COMMAND...: run one step with its output in $D/log/NAME.log; the step may
# print a progress line on the console (this script's output) through file descriptor 3.
step() {
  STEP=$1; shift
  t=$(clock)
  say "$STEP: started"
  if "$@" 3>&1 >>"$D/log/$STEP.log" 2>&1; then
    say "$STEP: done in $(since "$t")s"
  else
    rc=$?
    say "$STEP: FAILED in $(since "$t")s (exit $rc); last lines of its log:"
    tail -n 30 "$D/log/$STEP.log" | sed 's/^/dask-secure-cloud: | /'
    exit "$rc"
  fi
}
# retry COMMAND...: 4 attempts with growing pauses (30 s in all), within the deadline:
# enough for a mirror's hiccup, short enough that no route out fails the boot fast.
retry() {
  n=1
  until "$@"; do
    if [ "$n" -ge 4 ]; then echo "giving up after $n attempts"; return 1; fi
    if past_deadline; then echo "giving up after $n attempts: boot deadline reached"; return 1; fi
    echo "attempt $n failed; retrying in $((n * 5))s"
    sleep $((n * 5)); n=$((n + 1))
  done
}
apt_install() {
  if [ -n "$LOCAL" ]; then
    echo "would need $*, but never installs system packages on this machine (a local VM)"
    return 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "needs $*, but this image has no apt-get: use an image that has them"
    return 1
  fi
  say "$STEP: installing from the distribution's packages: $*" >&3
  export DEBIAN_FRONTEND=noninteractive
  # The dpkg lock is held by unattended-upgrades on a cloud VM's first boot: wait for it.
  retry apt-get -q -o DPkg::Lock::Timeout=300 -o APT::Update::Error-Mode=any update &&
    retry apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "$@"
}
