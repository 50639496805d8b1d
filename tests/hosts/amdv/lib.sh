# Shared by build.sh and run.sh. Sourced, not run.
amdv_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
amdv_repo=$(cd "$amdv_dir/../../.." && pwd)
amdv_cache=${TSVMM_CACHE:-$HOME/.cache/tsvmm}

# Progress and errors on stderr, one line each.
log() { printf '[amdv] %s\n' "$*" >&2; }
die() { printf '[amdv] ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=../../../fixtures/lib/debian-kernel.sh
source "$amdv_repo/fixtures/lib/debian-kernel.sh"

# The modules L1 loads (their depends= are added), and their parameters.
# kvm_amd: nested paging on, no nesting of its own (L2 is the last level).
amdv_modules=(kvm kvm_amd overlay 9p 9pnet_virtio virtio_pci virtio_rng tun)
declare -A amdv_module_params=([kvm_amd]='npt=1 nested=0')

# amdv_key PKG VER: the cache key, a hash of the scripts that make L1 and
# of the package versions that go into it (as fixtures/build-all.sh does).
# shellcheck source=../../../fixtures/lib/key.sh
source "$amdv_repo/fixtures/lib/key.sh"
amdv_key() {
  content_key "$amdv_repo" "$amdv_dir/build.sh" "$amdv_dir/lib.sh" "$amdv_dir/init" \
    "$amdv_repo/fixtures/lib/debian-kernel.sh" \
    "kernel $1 $2" "busybox $(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null)"
}
