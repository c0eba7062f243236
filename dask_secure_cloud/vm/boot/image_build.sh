# shellcheck shell=sh
# The image builder's last step (dask secure-cloud image build), run after the
# provisioning steps in place of Dask. Only a builder's boot.sh carries it (as its
# extra_bootstrap: imaging/build.py), not a cluster VM's, from the next line on.
# image_build: the image builder runs this after the provisioning steps instead of Dask.
# It records what it provisioned, checks it as a VM booting from the image will, leaves
# no file of this boot behind, and powers off: the image is made from its disk.
image_build() {
  # shellcheck disable=SC2034 # read by on_exit (common.sh) when a check fails
  STEP=image-check
  mkdir -p "$LOCAL/var/lib/dask-secure-cloud"
  software >"$LOCAL/var/lib/dask-secure-cloud/provisioned"
  if ! provisioned; then
    rm -f "$LOCAL/var/lib/dask-secure-cloud/provisioned"
    say "image-check: what was provisioned does not work as built"
    exit 1
  fi
  find "$D" -mindepth 1 -maxdepth 1 ! -name venv -exec rm -rf {} +
  # Azure's agent generalizes a VM for capture (its user, host keys, its own state).
  if [ -z "$LOCAL" ] && command -v waagent >/dev/null 2>&1; then
    waagent -deprovision+user -force >/dev/null 2>&1 || true
  fi
  if [ -z "$LOCAL" ] && command -v cloud-init >/dev/null 2>&1; then
    # Nor this VM's network (its interfaces, by MAC): cloud-init writes a clone's own.
    # Left, a clone's boot waits for interfaces it does not have.
    rm -f /etc/network/interfaces.d/50-cloud-init /etc/netplan/50-cloud-init.yaml \
      /etc/systemd/network/10-cloud-init-*.network
    cloud-init clean --logs >/dev/null 2>&1 || true
    # A clone must not keep this VM's identity: an empty machine id is made anew at each
    # clone's boot. Not "uninitialized", which is systemd's first boot: it would apply
    # every unit preset again (networkd's wait-online among them, stalling the boot).
    : >/etc/machine-id
  fi
  sync
  say "image-build: done after $(since "$T0")s; powering off"
  power_off now
  exit 0
}
