#!/usr/bin/env bash
# Build corescale's real guest: a Debian 12 (bookworm) disk image that a VM boots with
# QEMU's direct kernel boot, for workloads (sshd, python3 -m http.server, openssl speed):
#   disk.qcow2     ext4 on the whole disk (no partition table: root=/dev/vda); the base
#                  image that corescale attaches read-only under a per-VM overlay
#   vmlinux        the uncompressed kernel (PVH entry) of the kernel package in the image
#   initrd.img     the initramfs that package's initramfs-tools hook generated in the image
#   manifest.json  kernel release, installed versions, sha256 of the outputs, boot check
#
# Usage: node-vmm/guest/build-disk.sh [--arch x86_64] [--no-boot-check] [OUTDIR]
#   OUTDIR defaults to ${CORESCALE_CACHE:-$HOME/.cache/corescale}/guest/<arch>/debian
#   --no-boot-check  publish without booting the image once (boot-check-disk.sh): only for
#                    builders without QEMU; an image cached that way is rebuilt by the next
#                    build that checks.
# Boot: -kernel vmlinux -initrd initrd.img -append "console=ttyS0 root=/dev/vda rw" with the
# disk on virtio-blk, a NoCloud seed (volume label cidata) and the guest agent on the
# virtio-serial port org.qemu.guest_agent.0.
#
# No loop devices and no mounts: mmdebstrap (mode root: CI runs as root) installs into a
# directory, mkfs.ext4 -d copies it into a raw file, qemu-img converts that to qcow2. The
# packages are whatever bookworm (+ updates, + security) serves today: Debian replaces kernel
# packages with security updates and the old ones vanish, so no version is ever pinned. The
# build is skipped when the outputs exist, their sha256 match the manifest and the manifest's
# inputs key (the candidate versions of the key packages in the host's apt lists + the hash
# of these scripts) is what would be built now. It is published (next to OUTDIR, by rename)
# only after its boot check passed, and ends with one line that says what the image holds.
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
GUEST_DIR=$(dirname "$SCRIPT_PATH")
CACHE_DIR=${CORESCALE_CACHE:-$HOME/.cache/corescale}
usage() { printf 'usage: %s [--arch x86_64] [--no-boot-check] [OUTDIR]\n' "$0" >&2; exit 2; }
log() { printf 'guest/build-disk.sh: %s\n' "$*" >&2; }
die() { printf 'guest/build-disk.sh: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=lib.sh
. "$GUEST_DIR/lib.sh"

ARCH=x86_64
OUT=""
BOOT_CHECK=1
while [ $# -gt 0 ]; do
    case $1 in
        --arch) [ $# -ge 2 ] || usage; ARCH=$2; shift 2 ;;
        --arch=*) ARCH=${1#--arch=}; shift ;;
        --no-boot-check) BOOT_CHECK=0; shift ;;
        -h|--help) usage ;;
        -*) printf 'guest/build-disk.sh: error: unknown option %s\n' "$1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
    esac
done

# Per-architecture facts. ppc64le (linux-image-powerpc64le ships an ELF vmlinux: copy it,
# console hvc0, pseries) and aarch64 (linux-image-arm64's Image, console ttyAMA0, virt) go
# here, with mmdebstrap --arch and a foreign-architecture boot check.
case $ARCH in
    x86_64) DEB_ARCH=amd64; FLAVOUR=amd64 ;;
    ppc64le|aarch64) die "--arch $ARCH: the Debian disk image is built for x86_64 only so far (the initramfs guest, build.sh, has ppc64le)" ;;
    *) die "--arch must be x86_64, not '$ARCH'" ;;
esac
OUT=${OUT:-$CACHE_DIR/guest/$ARCH/debian}
OUT=$(readlink -m "$OUT")
SUITE=bookworm
MIRRORS=("deb http://deb.debian.org/debian $SUITE main"
         "deb http://deb.debian.org/debian $SUITE-updates main"
         "deb http://deb.debian.org/debian-security $SUITE-security main")
# 3 GiB: the root file system holds ~700 MB (400 MB of it the kernel's modules); the rest
# is room for a workload's files and apt installs in the per-VM overlay. A qcow2 stores only
# what is written, so the size costs nothing until it is used; cloud-init's resizefs grows
# the file system when a VM's overlay is made larger.
DISK_SIZE=3G
# What the guest is for (see the header); systemd-networkd (in systemd) + systemd-resolved
# render cloud-init's network config and run DHCP; no Recommends.
INCLUDE=(linux-image-$FLAVOUR initramfs-tools systemd-sysv udev systemd-resolved cloud-init
         qemu-guest-agent openssh-server python3 openssl ca-certificates sudo procps iproute2)
# The packages whose versions decide a rebuild and that the manifest records.
KEY_PKGS=(linux-image-$FLAVOUR initramfs-tools systemd udev cloud-init qemu-guest-agent
          openssh-server python3 openssl sudo)

export PATH=$PATH:/usr/sbin:/sbin
for tool in apt-cache apt-get dpkg dpkg-query mmdebstrap mkfs.ext4 qemu-img readelf od xz sha256sum systemctl chroot; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' is missing (scripts/install-deps.sh installs them)"
done
[ "$(id -u)" = 0 ] || die "run as root: mmdebstrap --mode=root, and mkfs.ext4 -d keeps the files' owners (CI runs as root)"

# ---- inputs key ---------------------------------------------------------------------------
# candidate_versions PKG... -> "PKG VERSION": the highest version each package has in
# bookworm, bookworm-updates or bookworm-security of the host's apt lists (what mmdebstrap
# will install from the mirrors above; backports and other sources are ignored). One
# apt-cache call: each costs about half a second.
candidate_versions() {
    local p v
    declare -A best=()
    while read -r p v; do
        if [ -z "${best[$p]:-}" ] || dpkg --compare-versions "$v" gt "${best[$p]}"; then best[$p]=$v; fi
    done < <(apt-cache madison "$@" 2>/dev/null | awk -F'|' -v s="$SUITE" \
        '$3 ~ (" " s "(-updates|-security)?/main ") && $3 ~ /Packages/ {gsub(/ /, "", $1); gsub(/ /, "", $2); print $1, $2}')
    for p in "${!best[@]}"; do printf '%s %s\n' "$p" "${best[$p]}"; done
}
declare -A cand=()
read_candidates() { while read -r p v; do cand[$p]=$v; done < <(candidate_versions "${KEY_PKGS[@]}"); }
read_candidates
if [ "${#cand[@]}" -ne "${#KEY_PKGS[@]}" ]; then
    log "running apt-get update (the host's apt lists lack some of: ${KEY_PKGS[*]})"
    apt-get update -qq >&2 || die "apt-get update failed"
    read_candidates
fi
for p in "${KEY_PKGS[@]}"; do
    [ -n "${cand[$p]:-}" ] || die "package $p has no $SUITE version in the host's apt lists (is a Debian 12 bookworm source configured?)"
done
script_sha=$(cat "$SCRIPT_PATH" "$GUEST_DIR/disk-config.sh" "$GUEST_DIR/boot-check-disk.sh" "$GUEST_DIR/lib.sh" | sha256sum | cut -d' ' -f1)
inputs_key=$( { for p in "${KEY_PKGS[@]}"; do printf '%s=%s\n' "$p" "${cand[$p]}"; done
               printf 'build-disk.sh=%s\n' "$script_sha"; } | sort | tr '\n' ';')

# ---- cache --------------------------------------------------------------------------------
OUTPUTS=(disk.qcow2 vmlinux initrd.img)
manifest=$OUT/manifest.json
mjson() { sed -n "s/^ *\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" "$2" | head -n1; }
summary() {
    local m=$1
    printf '%s: Debian 12 disk, kernel %s (linux-image-%s %s), systemd %s, cloud-init %s, qemu-ga %s, openssh %s, python3 %s, openssl %s; ext4 %s in qcow2 %s MB; boot check: agent %s s, cloud-init %s s, sshd %s s\n' \
        "$ARCH" "$(mjson kernel_release "$m")" "$FLAVOUR" "$(mjson "linux-image-$FLAVOUR" "$m")" \
        "$(mjson systemd "$m")" "$(mjson cloud-init "$m")" "$(mjson qemu-guest-agent "$m")" \
        "$(mjson openssh-server "$m")" "$(mjson python3 "$m")" "$(mjson openssl "$m")" \
        "$(mjson virtual_size "$m")" "$(( $(mjson disk_bytes "$m") / 1000000 ))" \
        "$(mjson agent "$m")" "$(mjson cloud_init "$m")" "$(mjson sshd "$m")"
}
paths() { printf 'disk=%s\nvmlinux=%s\ninitrd=%s\nmanifest=%s\n' "$OUT/disk.qcow2" "$OUT/vmlinux" "$OUT/initrd.img" "$manifest"; }
if [ "$BOOT_CHECK" = 1 ] && [ -f "$manifest" ] && grep -q '"boot_check_seconds": null' "$manifest"; then
    log "the cached image was never booted (built with --no-boot-check): rebuilding"
elif [ -f "$manifest" ]; then
    fresh=1
    [ "$(mjson inputs_key "$manifest")" = "$inputs_key" ] || fresh=0
    for f in "${OUTPUTS[@]}"; do
        [ "$fresh" = 1 ] && [ -f "$OUT/$f" ] || { fresh=0; break; }
        want=$(sed -n "s/^ *\"$f\": { *\"sha256\": \"\([0-9a-f]*\)\".*/\1/p" "$manifest")
        [ "$want" = "$(sha256sum "$OUT/$f" | cut -d' ' -f1)" ] || fresh=0
    done
    if [ "$fresh" = 1 ]; then
        log "up to date: reusing the image in $OUT"
        summary "$manifest"
        paths
        exit 0
    fi
    log "inputs changed or outputs differ from the manifest: rebuilding"
fi

# ---- rootfs -------------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
# Next to OUTDIR: the outputs are published by rename, on the same file system.
WORK=$(mktemp -d "$(dirname "$OUT")/.$(basename "$OUT")-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"   # apt's sandbox user (_apt) downloads into it
R=$WORK/root
t_start=$(date +%s)
log "mmdebstrap $SUITE ($DEB_ARCH) with: ${INCLUDE[*]}"
# No man pages, translations or docs (copyright files are kept): the dpkg options stay in
# the image (/etc/dpkg/dpkg.cfg.d/99mmdebstrap), so later installs in a VM skip them too.
mmdebstrap --mode=root --variant=minbase --format=directory --arch="$DEB_ARCH" \
    --include="$(IFS=,; printf '%s' "${INCLUDE[*]}")" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$SUITE" "$R" "${MIRRORS[@]}" >&2 || die "mmdebstrap failed (above)"
t_rootfs=$(date +%s)

kernels=("$R"/boot/vmlinuz-*)
[ "${#kernels[@]}" = 1 ] && [ -f "${kernels[0]}" ] || die "expected one kernel in $R/boot, found: ${kernels[*]}"
kver=${kernels[0]#"$R"/boot/vmlinuz-}
[ -f "$R/boot/initrd.img-$kver" ] || die "initramfs-tools generated no /boot/initrd.img-$kver"

# ---- configuration (all of it here; see README.md "Disk image") ---------------------------
# shellcheck source=disk-config.sh
. "$GUEST_DIR/disk-config.sh"
configure_rootfs "$R" "$kver"
check_rootfs "$R" "$kver"

# ---- outputs ------------------------------------------------------------------------------
B=$WORK/out
mkdir -p "$B"
extract_pvh_vmlinux "$R/boot/vmlinuz-$kver" "$B/vmlinux"
for opt in CONFIG_PVH CONFIG_ACPI_HOTPLUG_CPU CONFIG_HOTPLUG_CPU CONFIG_SERIAL_8250_CONSOLE; do
    grep -qx "$opt=y" "$R/boot/config-$kver" || die "kernel config lacks $opt=y"
done
cp "$R/boot/initrd.img-$kver" "$B/initrd.img"
declare -A inst=()
while read -r p v; do inst[$p]=$v; done < <(dpkg-query --admindir="$R/var/lib/dpkg" -W -f '${Package} ${Version}\n' \
    "${KEY_PKGS[@]}" "linux-image-$kver" 2>/dev/null)
n_pkgs=$(dpkg-query --admindir="$R/var/lib/dpkg" -W -f '${db:Status-Abbrev}\n' | grep -c '^ii')
root_mb=$(du -sm "$R" | cut -f1)

log "mkfs.ext4 -d: $root_mb MB of files into a $DISK_SIZE file system"
truncate -s "$DISK_SIZE" "$WORK/disk.raw"
# -E root_owner: / belongs to root; -L: a label for humans (the kernel is told /dev/vda).
mkfs.ext4 -q -F -L corescale-root -E root_owner=0:0 -d "$R" "$WORK/disk.raw" >&2 \
    || die "mkfs.ext4 -d failed"
rm -rf "$R"
# Compressed (-c): 256 MB instead of 767 MB in every cache and a quicker sha256 on each cache
# check, for ~17 s here; the boots measured under TCG were no slower (decompressing a
# 64 KiB cluster is cheap next to the emulated CPU; guest writes go to the overlay).
log "qemu-img convert to a compressed qcow2"
qemu-img convert -f raw -O qcow2 -c -m 2 -W "$WORK/disk.raw" "$B/disk.qcow2" >&2
rm -f "$WORK/disk.raw"
t_image=$(date +%s)

# ---- boot check ---------------------------------------------------------------------------
agent_s=null; ci_s=null; ssh_s=null
if [ "$BOOT_CHECK" = 1 ]; then
    log "booting the new image once (QEMU/TCG): agent, cloud-init and sshd must answer"
    times=$(bash "$GUEST_DIR/boot-check-disk.sh" --arch "$ARCH" "$B") \
        || die "the image built from linux-image-$kver failed its boot check (above); nothing was published"
    read -r agent_s ci_s ssh_s <<<"$times"
fi
t_check=$(date +%s)

# ---- publish ------------------------------------------------------------------------------
mkdir -p "$OUT"
{
    printf '{\n'
    printf '  "kernel_release": "%s",\n' "$kver"
    printf '  "suite": "%s",\n' "$SUITE"
    printf '  "packages": {\n'
    first=1
    for p in $(printf '%s\n' "${!inst[@]}" | sort); do
        [ "$first" = 1 ] || printf ',\n'
        first=0
        printf '    "%s": "%s"' "$p" "${inst[$p]}"
    done
    printf '\n  },\n'
    printf '  "packages_installed": %s,\n' "$n_pkgs"
    printf '  "virtual_size": "%s",\n' "$DISK_SIZE"
    printf '  "rootfs_mb": %s,\n' "$root_mb"
    printf '  "disk_bytes": %s,\n' "$(stat -c %s "$B/disk.qcow2")"
    printf '  "outputs": {\n'
    sep=,
    for f in "${OUTPUTS[@]}"; do
        [ "$f" != "${OUTPUTS[-1]}" ] || sep=
        printf '    "%s": { "sha256": "%s", "bytes": %s }%s\n' "$f" "$(sha256sum "$B/$f" | cut -d' ' -f1)" "$(stat -c %s "$B/$f")" "$sep"
    done
    printf '  },\n'
    printf '  "boot_check_seconds": %s,\n' "$ci_s"
    printf '  "boot_check": {\n    "agent": %s,\n    "cloud_init": %s,\n    "sshd": %s\n  },\n' "$agent_s" "$ci_s" "$ssh_s"
    printf '  "build_seconds": { "rootfs": %s, "image": %s, "boot_check": %s },\n' \
        "$((t_rootfs - t_start))" "$((t_image - t_rootfs))" "$((t_check - t_image))"
    printf '  "build_disk_sh_sha256": "%s",\n' "$script_sha"
    printf '  "inputs_key": "%s"\n' "$inputs_key"
    printf '}\n'
} >"$B/manifest.json"
# Each file by rename, the manifest last: a reader that sees a new manifest sees the files
# it describes, and an interrupted publish fails the sha256 check of the next build.
# The disk is published under a name of its own content, disk-<sha256 prefix>.qcow2, and
# disk.qcow2 becomes a symlink to it: VMs' overlays are made on the resolved name, so a
# rebuild never changes the image an existing overlay was made on. Older versions stay
# (remove one when no VM's disk was made from it; `qemu-img info` of an overlay names it).
rm -f "$manifest"
disk_ver="disk-$(sha256sum "$B/disk.qcow2" | cut -c1-16).qcow2"
mv -f "$B/disk.qcow2" "$OUT/$disk_ver"
ln -sfn "$disk_ver" "$B/disk.qcow2"
for f in "${OUTPUTS[@]}" manifest.json; do
    mv -f "$B/$f" "$OUT/$f"
done
log "built in $((t_check - t_start)) s (rootfs $((t_rootfs - t_start)) s, image $((t_image - t_rootfs)) s, boot check $((t_check - t_image)) s)"
summary "$manifest"
paths
