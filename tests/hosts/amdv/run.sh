#!/usr/bin/env bash
# run.sh [OPTIONS] -- CMD [ARGS...]
#
# Boots the emulated AMD-V host (L1: QEMU TCG with SVM and nested paging,
# Debian's kernel, kvm_amd), runs CMD there in this machine's own file
# system (read-only 9p under a tmpfs overlay: writes stay in L1) in the
# current directory, and exits with CMD's exit status. CMD's stdout and
# stderr stream to ours; its stdin is /dev/null. L1's console (kernel log)
# goes to a log file, named when something fails.
#
#   --memory SIZE     L1 RAM (QEMU -m), default 4G
#   --smp N           L1 CPUs, default 2
#   --timeout S       give up after S seconds (default 3000): exit 124
#   --results DIR     share DIR (created if missing) writable, at the same path in L1
#   --env NAME[=VAL]  also pass NAME (its value here, or VAL); repeatable
#   --keep-log        keep the log directory even on success, and print its path
#   -v, --verbose     timings on stderr: build, boot, command, shutdown
#   (environment: TSVMM_AMDV_TCG_THREADS=multi|single, QEMU's TCG threading)
#
# CMD sees PATH, HOME, TSVMM_CACHE and CI as here, TSVMM_AMDV_L1=1, and
# a /dev/kvm backed by (emulated) hardware virtualization. Exit status:
# CMD's; 124 on timeout; 125 when L1 did not get as far as running CMD.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

usage() { sed -n '2,24s/^# \{0,1\}//p' "$0" >&2; }
fatal() { printf '[amdv] ERROR: %s\n' "$*" >&2; exit 125; }

memory=4G smp=2 tcg_threads=${TSVMM_AMDV_TCG_THREADS:-multi} timeout=3000 results='' keep_log=0 verbose=0 extra_env=()
while (($#)); do
  case $1 in
    --memory) memory=${2:?--memory needs a value}; shift 2 ;;
    --smp) smp=${2:?--smp needs a value}; shift 2 ;;
    --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
    --results) results=${2:?--results needs a directory}; shift 2 ;;
    --env) extra_env+=("${2:?--env needs NAME or NAME=VALUE}"); shift 2 ;;
    --keep-log) keep_log=1; shift ;;
    -v | --verbose) verbose=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage; fatal "unknown option $1 (the command goes after --)" ;;
  esac
done
(($#)) || { usage; fatal "no command given (run.sh [OPTIONS] -- CMD [ARGS...])"; }
[[ $timeout =~ ^[0-9]+$ && $timeout -gt 0 ]] || fatal "--timeout must be a positive number of seconds"
[[ $smp =~ ^[0-9]+$ && $smp -gt 0 ]] || fatal "--smp must be a positive number"
[[ $tcg_threads == multi || $tcg_threads == single ]] || fatal "TSVMM_AMDV_TCG_THREADS must be multi or single, not '$tcg_threads'"

t0=$(date +%s.%N)
since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }'; }
vlog() { ((verbose)) && log "$*"; return 0; }

l1=$("$here/build.sh") || fatal "cannot build L1 (see above)"
l1=${l1##*$'\n'}
vlog "L1 ready in $(since "$t0") s: $l1"

cwd=$(pwd -P)
case $cwd/ in
  /proc/* | /sys/* | /dev/*)
    fatal "the current directory $cwd is hidden in L1 (fresh /proc, /sys, /dev there): run from elsewhere" ;;
  /tmp/* | /run/*)
    # L1 mounts a fresh /tmp and /run: share this directory on its own (a
    # clean clone in a temporary directory, as CI may make).
    cwd_share=$cwd ;;
esac
if [[ -n $results ]]; then
  mkdir -p -- "$results" || fatal "cannot create --results $results"
  results=$(cd -- "$results" && pwd -P)
  [[ -w $results ]] || fatal "--results $results is not writable"
  [[ $results != *$'\n'* ]] || fatal "--results: a path with a newline is not supported"
fi

job=$(mktemp -d "${TMPDIR:-/tmp}/tsvmm-amdv.XXXXXX")
console=$job/console.log qemu_log=$job/qemu.log
: >"$job/stdout"
: >"$job/stderr"
[[ -n $results ]] && printf '%s\n' "$results" >"$job/results_path"
[[ -n ${cwd_share:-} ]] && printf '%s\n' "$cwd_share" >"$job/cwd_path"

# The command, as a bash script run in the chroot: exports, cd, exec.
{
  echo '#!/bin/bash'
  envs=("PATH=$PATH" "HOME=$HOME" TSVMM_AMDV_L1=1)
  [[ -n ${TSVMM_CACHE+set} ]] && envs+=("TSVMM_CACHE=$TSVMM_CACHE")
  [[ -n ${CI+set} ]] && envs+=("CI=$CI")
  for e in "${extra_env[@]}"; do
    name=${e%%=*}
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || fatal "--env: bad name in $e"
    if [[ $e == *=* ]]; then envs+=("$e"); elif [[ -n ${!name+set} ]]; then envs+=("$name=${!name}"); fi
  done
  for e in "${envs[@]}"; do printf 'export %q\n' "$e"; done
  printf 'cd -- %q || { echo "[amdv] cannot cd to %q in L1" >&2; exit 126; }\n' "$cwd" "$cwd"
  printf 'command -v %q >/dev/null || { echo "[amdv] %q: command not found in L1" >&2; exit 127; }\n' "$1" "$1"
  # Works around a QEMU TCG artifact (see kvm-pin.py): pin L1 KVM's static keys first.
  printf 'exec {pin}< <(exec python3 %q)\n' "$here/kvm-pin.py"
  printf 'read -r -u "$pin" ready && [[ $ready == ready ]] || { echo "[amdv] kvm-pin.py did not start" >&2; exit 125; }\n'
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$job/cmd.sh"

esc() { printf '%s' "${1//,/,,}"; }
share() { # share TAG PATH [readonly]
  printf -- '-fsdev\nlocal,id=%s,path=%s,security_model=none,multidevs=remap%s\n-device\nvirtio-9p-pci,fsdev=%s,mount_tag=%s\n' \
    "$1" "$(esc "$2")" "${3:+,readonly=on}" "$1" "$1"
}
mapfile -t shares < <(
  share hostroot / readonly
  share job "$job"
  [[ -z $results ]] || share results "$results"
  [[ -z ${cwd_share:-} ]] || share cwd "$cwd_share" readonly
)
# A hung L1 kernel panics, and so ends QEMU (panic=-1, -no-reboot), instead
# of holding the run until --timeout: a CPU stuck in the kernel for 60 s
# (the soft-lockup watchdog at twice watchdog_thresh), or a task blocked
# for 120 s (the hung-task detector). Under the emulator, L1's kernel has
# hung both ways: a TLB-flush IPI that another CPU never answered (a CPU
# stuck in smp_call_function_many_cond for 400 s and more, 2026-12-06),
# and kvm_destroy_vm waiting on kthread_stop (2026-12-03).
l1_hang_panics="softlockup_panic=1 watchdog_thresh=30 hung_task_panic=1"
qemu=(qemu-system-x86_64
  -machine q35 -accel "tcg,thread=$tcg_threads" -cpu EPYC,+svm,+npt,-xsave
  -smp "$smp" -m "$memory"
  -nodefaults -no-user-config -display none -no-reboot
  -kernel "$l1/vmlinux" -initrd "$l1/initrd.gz"
  -append "console=ttyS0 panic=-1 tsc=reliable $l1_hang_panics"
  -chardev "file,id=con,path=$(esc "$console")" -serial chardev:con
  "${shares[@]}"
  -device virtio-rng-pci)

qpid='' tails=()
cleanup() {
  [[ -n $qpid ]] && kill "$qpid" 2>/dev/null
  ((${#tails[@]})) && kill "${tails[@]}" 2>/dev/null
  return 0
}
trap 'cleanup; log "interrupted; logs in $job"; exit 130' INT TERM HUP

tq=$(date +%s.%N)
timeout --kill-after=15 "$timeout" "${qemu[@]}" </dev/null >"$qemu_log" 2>&1 &
qpid=$!
# The command writes to files on the job share (9p, cache=none: each write
# has reached the file when it returns); tail streams them until QEMU ends.
tail -n +1 -s 0.2 --pid="$qpid" -f "$job/stdout" &
tails+=($!)
tail -n +1 -s 0.2 --pid="$qpid" -f "$job/stderr" >&2 &
tails+=($!)
if ((verbose)); then
  (
    while [[ ! -e $job/started ]] && kill -0 "$qpid" 2>/dev/null; do sleep 0.1; done
    [[ -e $job/started ]] && log "command started $(since "$tq") s after QEMU (L1 uptime $(cat "$job/started") s)"
  ) &
  tails+=($!)
fi

set +e
wait "$qpid"
qrc=$?
qpid=''
wait "${tails[@]}" 2>/dev/null
tails=()
set -e
vlog "QEMU ended $(since "$tq") s after it started, status $qrc; total $(since "$t0") s"

failed() {
  log "$1"
  log "L1 console log: $console"
  [[ -s $qemu_log ]] && log "QEMU log: $qemu_log"
  if [[ -s $console ]]; then
    log "last lines of the console log:"
    tail -n 15 "$console" | sed 's/^/[amdv]   /' >&2
  else
    log "the console log is empty: L1's kernel never started (too little --memory for its 66 MB vmlinux?)"
  fi
  exit "$2"
}
if [[ -s $job/rc ]]; then
  rc=$(cat "$job/rc")
  [[ $rc =~ ^[0-9]+$ ]] || failed "L1 wrote a bad exit status: $rc" 125
  if ((keep_log)); then log "log directory kept: $job"; else rm -rf "$job"; fi
  exit "$rc"
fi
((qrc == 124)) && failed "timed out after $timeout s (--timeout)" 124
[[ -s $job/error ]] && failed "L1 failed before the command could run: $(cat "$job/error")" 125
[[ -e $job/started ]] && failed "L1 ended while the command was running (QEMU status $qrc)" 125
failed "L1 did not boot far enough to run the command (QEMU status $qrc)" 125
