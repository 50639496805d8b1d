#!/usr/bin/env bash
# build.sh [--force] [--prune]: builds the emulated AMD-V host (L1) once and prints
# its directory, ${TSVMM_CACHE:-~/.cache/tsvmm}/amdv/<key>/, on stdout:
#   vmlinuz        Debian's linux-image-6.1.0-*-amd64 kernel, unmodified
#   vmlinux        the same kernel decompressed (ELF, booted through PVH)
#   initrd.gz      busybox-static, ./init, the modules in modules.load
#   release        uname -r of that kernel
#   modules.load   "name path params" per module, in load order
# Everything comes from Debian packages: qemu-system-x86 and busybox-static
# are installed when missing, the kernel package is downloaded (apt-get
# download) into the fixtures' shared debian-kernel-<version>/ directory.
#   --force  rebuild even if up to date
#   --prune  delete the L1 builds of other keys (older scripts or kernels)
# See README.md.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
trap 'rc=$?; ((rc == 0)) || printf "[amdv] ERROR: build.sh failed (line %s: %s)\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

force=0 prune=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    --prune) prune=1 ;;
    -h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "build.sh: unknown argument $arg (usage: build.sh [--force] [--prune])" ;;
  esac
done
# prune_others DIR: with --prune, delete the L1 builds of other keys.
prune_others() {
  ((prune)) || return 0
  local d
  for d in "$amdv_cache"/amdv/*/; do
    d=${d%/}
    [[ $d == "$1" ]] || { log "prune: $d"; rm -rf "$d"; }
  done
}

packages=(qemu-system-x86 busybox-static cpio gzip xz-utils binutils)
missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ $status == 'install ok installed' ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  _dk_sudo apt-get update -qq >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive _dk_sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
fi
busybox=/bin/busybox
ldd_out=$(ldd "$busybox" 2>&1 || true)
[[ -x $busybox && $ldd_out != *'=>'* ]] || die "$busybox is missing or not static (install busybox-static)"

kernel_package=$(debian_kernel_package "$amdv_cache/amdv/.kernel-package") || exit 1
read -r pkg ver <<<"$kernel_package"
key=$(amdv_key "$pkg" "$ver")
out=$amdv_cache/amdv/$key
if [[ -f $out/initrd.gz && $force == 0 ]]; then
  prune_others "$out"
  printf '%s\n' "$out"
  exit 0
fi

mkdir -p "$amdv_cache/amdv"
exec 9>"$amdv_cache/amdv/.lock"
flock 9
if [[ -f $out/initrd.gz && $force == 0 ]]; then
  printf '%s\n' "$out"
  exit 0
fi
rm -rf "$amdv_cache"/amdv/*.tmp.*
start=$(date +%s.%N)
log "building L1 ($pkg $ver) into $out"

deb_dir=$(debian_kernel_fetch "$amdv_cache/fixtures" "$pkg" "$ver")
release=$(cat "$deb_dir/release")
root=$deb_dir/root

tmp=$out.tmp.$$
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp/root"

modules_index "$root" "$release"
modules_closure "${amdv_modules[@]}" >"$tmp/closure"
((${#MOD_ABSENT[@]} == 0)) || die "$pkg has no module ${MOD_ABSENT[*]} (neither built in nor in lib/modules)"

ir=$tmp/root
mkdir -p "$ir"/{bin,sbin,etc,proc,sys,dev,tmp,run,job,lower,rw,newroot} "$ir/lib/modules/$release"
chmod 1777 "$ir/tmp"
cp "$busybox" "$ir/bin/busybox"
for applet in $("$busybox" --list); do
  [[ $applet == busybox ]] || ln -sf busybox "$ir/bin/$applet"
done
install -m 0755 "$here/init" "$ir/init"
printf '%s\n' "$release" >"$ir/etc/release"
while read -r name path; do
  mkdir -p "$ir/lib/modules/$release/$(dirname "$path")"
  cp "$root/lib/modules/$release/$path" "$ir/lib/modules/$release/$path"
  printf '%s %s %s\n' "$name" "$path" "${amdv_module_params[$name]:-}"
done <"$tmp/closure" >"$ir/etc/modules.load"
cp "$ir/etc/modules.load" "$tmp/modules.load"

epoch=$(stat -c %Y "$root/boot/vmlinuz-$release")
pack_initramfs "$ir" "$tmp/initrd.gz" "$epoch"
listing=$(gzip -dc "$tmp/initrd.gz" | cpio -t --quiet)
for want in init bin/busybox bin/sh etc/modules.load; do
  grep -qx "$want" <<<"$listing" || die "the initrd has no /$want"
done
cp "$root/boot/vmlinuz-$release" "$tmp/vmlinuz"
# L1 boots the same kernel as an ELF through its PVH entry: under TCG the
# bzImage's own xz decompressor costs about 3 s of every boot. The payload
# is at (setup_sects + 1) * 512 + payload_offset (boot protocol 2.08+).
le() { od -An -tu"$2" -j "$1" -N "$2" "$tmp/vmlinuz" | tr -d ' '; }
setup_sects=$(le $((0x1f1)) 1)
((setup_sects)) || setup_sects=4
payload=$(((setup_sects + 1) * 512 + $(le $((0x248)) 4)))
# (The kernel appends the uncompressed size after the stream: --single-stream.)
xz -dc --single-stream < <(tail -c +$((payload + 1)) "$tmp/vmlinuz") >"$tmp/vmlinux" ||
  die "cannot decompress the payload of vmlinuz-$release (not xz?)"
[[ $(head -c 4 "$tmp/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] || die "the payload of vmlinuz-$release is not an ELF"
readelf -n "$tmp/vmlinux" | grep -q 'Xen.*(0x00000012)' || die "vmlinuz-$release has no PVH entry note (CONFIG_PVH)"
printf '%s\n' "$release" >"$tmp/release"
printf '%s %s\n' "$pkg" "$ver" >"$tmp/package"
rm -rf "$ir" "$tmp/closure"

rm -rf "$out"
mv -T "$tmp" "$out"
trap - EXIT
prune_others "$out"
log "L1 built in $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s: $(wc -l <"$out/modules.load") modules, initrd $(stat -c %s "$out/initrd.gz") bytes"
printf '%s\n' "$out"
