#!/usr/bin/env bash
# The second half of `npm test`: on a host whose KVM emulates guest kernel
# code (PVM), runs the boot and CLI tests again inside the emulated AMD-V
# host (run.sh), where /dev/kvm is hardware-virtualised and stock kernels
# boot. On a hardware-virtualised host the first half already ran them there.
#
# L1 is QEMU's TCG emulating a whole machine, and now and then its kernel
# dies under the emulator (a lockup or a "stack guard page was hit" in its
# own exception entry, with no L2 code on the stack), or hangs, which its
# kernel command line turns into a panic (run.sh). When that happens
# (run.sh exits 125), the test files that had not ended run again in a
# fresh L1, up to TSVMM_AMDV_ATTEMPTS times in all (default 5); the same
# when vitest's main process dies of SIGSEGV there (exit 139), which runs
# no VMM code. A test that fails is never run again: only files L1 did not
# let finish are.
#
# suite.sh [VITEST ARGS...]: with arguments, they go to vitest as they are
# and the run is not retried.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

kind=$("$here/detect.sh")
case $kind in
  hardware)
    echo "[amdv] /dev/kvm here is hardware-virtualised: the boot tests above ran on it; nothing more to run"
    exit 0 ;;
  none)
    echo "[amdv] no /dev/kvm here: the boot tests were skipped, and an emulated AMD-V host needs a KVM host to be worth its time; nothing more to run"
    exit 0 ;;
  pvm) ;;
  *) echo "[amdv] detect.sh said '$kind'" >&2; exit 1 ;;
esac

echo "[amdv] /dev/kvm here emulates guest kernel code: running the boot and CLI tests again inside the emulated AMD-V host"
cd "$repo"
# One test file at a time in L1: with two at once (two VMs starting and
# exiting together) L1's kernel died under the emulator in every L1 boot of
# two suite runs, and the SMP test failed; one at a time, none was seen.
vitest=(npx vitest run --maxWorkers=1 --minWorkers=1 --reporter=default --reporter=./tests/hosts/amdv/recorder.ts)
(($#)) && exec "$here/run.sh" -- "${vitest[@]}" "$@"

attempts=${TSVMM_AMDV_ATTEMPTS:-5}
[[ $attempts =~ ^[1-9][0-9]*$ ]] || die "TSVMM_AMDV_ATTEMPTS must be a positive number, not '$attempts'"
files=(tests/boot/*.test.ts tests/cli/*.test.ts)
record=$(mktemp -d "${TMPDIR:-/tmp}/tsvmm-amdv-record.XXXXXX")
trap 'rm -rf "$record"' EXIT

# A test file's record (recorder.ts's recordName): its state, then its failed tests' first error lines.
record_of() { echo "$record/${1//\//__}.state"; }
state_of() { local r; r=$(record_of "$1"); [[ -s $r ]] && read -r s _ <"$r" && echo "$s"; return 0; }

rc=0 boots=0 why=""
for ((attempt = 1; attempt <= attempts; attempt++)); do
  remaining=()
  for f in "${files[@]}"; do [[ -n $(state_of "$f") ]] || remaining+=("$f"); done
  ((${#remaining[@]})) || break
  if ((attempt > 1)); then
    log "$why (attempt $((attempt - 1)) of $attempts): running the ${#remaining[@]} test files that had not ended in a fresh L1"
  fi
  boots=$((boots + 1))
  set +e
  "$here/run.sh" --results "$record" --env TSVMM_AMDV_RECORD="$record" -- "${vitest[@]}" "${remaining[@]}"
  rc=$?
  set -e
  case $rc in
    125) why="L1 died under the emulator (its log is named above)" ;;
    # vitest's own process, which runs no VMM code (test files run in
    # child processes, the forks pool), killed by SIGSEGV: in L1, Node
    # processes now and then die in V8's JIT code under the emulator.
    139) why="vitest's main process died of SIGSEGV in L1 (the emulator: tests/hosts/amdv/README.md)" ;;
    *) break ;;
  esac
done

failed=() unfinished=()
for f in "${files[@]}"; do
  case $(state_of "$f") in
    failed) failed+=("$f") ;;
    passed | skipped) ;;
    *) unfinished+=("$f") ;;
  esac
done
if ((${#failed[@]})); then
  log "failed in L1: ${failed[*]}"
  # Each failed test's first error line (recorder.ts): the end of a long
  # log is the part a CI report keeps.
  for f in "${failed[@]}"; do tail -n +2 "$(record_of "$f")"; done
fi
((${#unfinished[@]})) && log "did not end in L1: ${unfinished[*]}"
if ((rc == 0)) && ((${#failed[@]} + ${#unfinished[@]})); then rc=1; fi
((rc == 0)) && log "all ${#files[@]} boot and CLI test files ended well in L1 (L1 booted $boots time(s))"
exit "$rc"
