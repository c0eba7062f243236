# shellcheck shell=sh
# The docker runtime's check for GPU workers: driver and container toolkit present.
# Part of every VM's boot.sh (bootscript.render_script), from the next line on.
gpu_check() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "this VM asks for GPUs but its image has no NVIDIA driver (no nvidia-smi): use a"
    echo "GPU image with the driver and the NVIDIA container toolkit (see the docs page of"
    echo "your cloud for one), or a worker type without GPUs"
    return 1
  fi
  nvidia-smi -L || return 1
  for tool in nvidia-ctk nvidia-container-runtime nvidia-container-toolkit; do
    command -v "$tool" >/dev/null 2>&1 && return 0
  done
  echo "the image has the NVIDIA driver but not the NVIDIA container toolkit, which"
  echo "docker --gpus needs: use a GPU image that has it (see the docs page of your cloud)"
  return 1
}
