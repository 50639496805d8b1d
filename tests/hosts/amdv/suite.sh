#!/usr/bin/env bash
# The second half of `npm test`: on a host whose KVM emulates guest kernel
# code (PVM), runs the boot and CLI tests again inside the emulated AMD-V
# host (run.sh), where /dev/kvm is hardware-virtualised and stock kernels
# boot. On a hardware-virtualised host the first half already ran them there.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)

kind=$("$here/detect.sh")
case $kind in
  hardware)
    echo "[amdv] /dev/kvm here is hardware-virtualised: the boot tests above ran on it; nothing more to run"
    ;;
  none)
    echo "[amdv] no /dev/kvm here: the boot tests were skipped, and an emulated AMD-V host needs a KVM host to be worth its time; nothing more to run"
    ;;
  pvm)
    echo "[amdv] /dev/kvm here emulates guest kernel code: running the boot and CLI tests again inside the emulated AMD-V host"
    cd "$repo"
    exec "$here/run.sh" -- npx vitest run tests/boot tests/cli "$@"
    ;;
  *)
    echo "[amdv] detect.sh said '$kind'" >&2
    exit 1
    ;;
esac
