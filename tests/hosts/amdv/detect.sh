#!/usr/bin/env bash
# detect.sh [-v]: what kind of /dev/kvm this machine has, on stdout:
#   hardware  KVM on VT-x or AMD-V (kvm_intel / kvm_amd, or the CPU flags
#             vmx / svm): guest kernel code runs in guest mode. Inside the
#             emulated AMD-V host (run.sh) this is what you get.
#   pvm       KVM without hardware virtualization: the PVM-style backend of
#             these machines (kvm_pvm), which emulates guest kernel code
#   none      no /dev/kvm
# -v also says on stderr what decided it. Exit status 0 in all three cases.
set -euo pipefail
verbose=0
[[ ${1:-} == -v ]] && verbose=1
why() { ((verbose)) && printf 'detect: %s\n' "$*" >&2; return 0; }

loaded() { [[ -d /sys/module/$1 ]] || grep -qs "^$1 " /proc/modules; }
cpu_flags() { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2; }

if [[ ! -c /dev/kvm ]]; then
  why "/dev/kvm is not a character device"
  echo none
elif loaded kvm_pvm; then
  why "kvm_pvm is loaded (/sys/module/kvm_pvm)"
  echo pvm
elif loaded kvm_amd || loaded kvm_intel; then
  why "kvm_amd or kvm_intel is loaded"
  echo hardware
elif [[ " $(cpu_flags) " == *' svm '* || " $(cpu_flags) " == *' vmx '* ]]; then
  why "/proc/cpuinfo has svm or vmx"
  echo hardware
else
  why "/dev/kvm exists, but no kvm_amd/kvm_intel and no svm/vmx flag"
  echo pvm
fi
