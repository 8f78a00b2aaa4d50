#!/usr/bin/env bash
# Build corescale's test/default guest image from Debian packages only:
#   vmlinux            uncompressed kernel (PVH entry) from linux-image-amd64 (Debian 12, 6.1)
#   initramfs.cpio.gz  busybox-static + qemu-guest-agent (with its shared libraries) + /init
#   manifest.json      package versions and sha256 of the outputs
#
# Usage: node-vmm/guest/build.sh [OUTDIR]
#   OUTDIR defaults to ${CORESCALE_CACHE:-$HOME/.cache/corescale}/guest/x86_64
#
# Nothing is installed into the host: packages are fetched with `apt-get download` and
# unpacked with `dpkg -x` into a scratch directory. The build is skipped when the outputs
# exist, their sha256 match the manifest and the manifest's inputs (package versions and
# this script's own hash) match what would be built now. `apt-get update` runs only when
# the package lists lack a package or a download fails.
#
# The guest's /init does NOT online hot-plugged CPUs: the node onlines them through the
# guest agent (guest-set-vcpus), which is what corescale tests.
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
OUT=${1:-${CORESCALE_CACHE:-$HOME/.cache/corescale}/guest/x86_64}
# Debian 12 ships 6.1; bookworm-backports carries newer kernels that we do not want.
KERNEL_SERIES=${CORESCALE_GUEST_KERNEL_SERIES:-6.1}
AGENT_PKG=qemu-guest-agent
BUSYBOX_PKG=busybox-static

log() { printf 'guest/build.sh: %s\n' "$*" >&2; }
die() { printf 'guest/build.sh: error: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg dpkg-deb cpio gzip xz od readelf objdump sha256sum find sort; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' is missing (apt-get install apt dpkg cpio gzip xz-utils coreutils binutils findutils)"
done

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        log "running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
}

# candidate_versions PKG... -> "PKG VERSION" lines for the versions apt would download
# (one apt-cache call: each call costs about half a second).
candidate_versions() {
    apt-cache policy "$@" 2>/dev/null | awk '
        /^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1) }
        /^  Candidate:/ { if ($2 != "(none)") print pkg, $2 }'
}

# kernel_meta_version -> highest linux-image-amd64 version in the KERNEL_SERIES series
kernel_meta_version() {
    apt-cache madison linux-image-amd64 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' \
        | grep -E "^${KERNEL_SERIES//./\\.}\." | sort -V | tail -n1 || true
}

meta_ver=$(kernel_meta_version)
if [ -z "$meta_ver" ]; then
    apt_update_once
    meta_ver=$(kernel_meta_version)
fi
[ -n "$meta_ver" ] || die "no linux-image-amd64 version ${KERNEL_SERIES}.x in the apt package lists (is a Debian 12 bookworm source configured?)"

# The metapackage depends on exactly one linux-image-<abi>-amd64 package of the same version.
kernel_pkg=$(apt-cache show "linux-image-amd64=$meta_ver" | awk -F': ' '/^Depends:/ {print $2; exit}' \
    | tr ',' '\n' | sed -E 's/^ +//; s/ .*//' | grep -E '^linux-image-[0-9].*-amd64$' | head -n1)
[ -n "$kernel_pkg" ] || die "cannot find the kernel package that linux-image-amd64=$meta_ver depends on"
kernel_ver=$meta_ver

# The agent's runtime dependency closure (Depends only; shared libraries are then resolved
# from the unpacked files, so an unneeded package costs only a download).
closure() {
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances --no-pre-depends "$AGENT_PKG" 2>/dev/null \
        | grep -v '^ ' | grep -v '^<' | grep -vx "$AGENT_PKG" | sort -u || true
}
lib_pkgs=$(closure)
declare -A cand=()
while read -r p v; do cand[$p]=$v; done < <(candidate_versions "$AGENT_PKG" "$BUSYBOX_PKG" $lib_pkgs)
if [ -z "${cand[$AGENT_PKG]:-}" ] || [ -z "${cand[$BUSYBOX_PKG]:-}" ]; then
    apt_update_once
    lib_pkgs=$(closure)
    while read -r p v; do cand[$p]=$v; done < <(candidate_versions "$AGENT_PKG" "$BUSYBOX_PKG" $lib_pkgs)
fi

declare -A pkg_ver=()
pkg_ver[$kernel_pkg]=$kernel_ver
pkg_ver[linux-image-amd64]=$meta_ver
for p in "$AGENT_PKG" "$BUSYBOX_PKG" $lib_pkgs; do
    [ -n "${cand[$p]:-}" ] || die "package $p has no installable version in the apt package lists"
    pkg_ver[$p]=${cand[$p]}
done
agent_ver=${pkg_ver[$AGENT_PKG]}
busybox_ver=${pkg_ver[$BUSYBOX_PKG]}

script_sha=$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)
# One line per input; the manifest stores the same text, so comparing it decides a rebuild.
inputs_key=$( { for p in "${!pkg_ver[@]}"; do printf '%s=%s\n' "$p" "${pkg_ver[$p]}"; done
               printf 'build.sh=%s\n' "$script_sha"; } | sort | tr '\n' ';')

manifest=$OUT/manifest.json
if [ -f "$manifest" ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
    old_key=$(sed -n 's/^ *"inputs_key": "\(.*\)",\{0,1\}$/\1/p' "$manifest")
    old_k_sha=$(sed -n 's/^ *"vmlinux": { *"sha256": "\([0-9a-f]*\)".*/\1/p' "$manifest")
    old_i_sha=$(sed -n 's/^ *"initramfs.cpio.gz": { *"sha256": "\([0-9a-f]*\)".*/\1/p' "$manifest")
    if [ "$old_key" = "$inputs_key" ] \
        && [ "$old_k_sha" = "$(sha256sum "$OUT/vmlinux" | cut -d' ' -f1)" ] \
        && [ "$old_i_sha" = "$(sha256sum "$OUT/initramfs.cpio.gz" | cut -d' ' -f1)" ]; then
        log "up to date (kernel $kernel_pkg $kernel_ver, agent $agent_ver)"
        printf 'vmlinux=%s\ninitramfs=%s\nmanifest=%s\n' "$OUT/vmlinux" "$OUT/initramfs.cpio.gz" "$manifest"
        exit 0
    fi
    log "inputs changed or outputs differ from the manifest: rebuilding"
fi

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/corescale-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/x" "$WORK/root"

# ---- download and unpack ------------------------------------------------------------------
specs=()
for p in "${!pkg_ver[@]}"; do
    [ "$p" = linux-image-amd64 ] && continue   # metapackage: nothing to unpack
    specs+=("$p=${pkg_ver[$p]}")
done
download() { (cd "$WORK/debs" && apt-get -q -o APT::Sandbox::User=root download "${specs[@]}" >&2); }
log "downloading ${#specs[@]} packages"
if ! download; then
    apt_update_once
    download || die "apt-get download failed for: ${specs[*]}"
fi
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$WORK/x"
done
X=$WORK/x

# ---- vmlinux: the compressed payload of the bzImage, decompressed ---------------------------
kver=${kernel_pkg#linux-image-}
bz=$X/boot/vmlinuz-$kver
[ -f "$bz" ] || die "kernel image $bz not found in $kernel_pkg"
rd_u() { od -An -t "u$2" -j "$1" -N "$2" "$bz" | tr -d ' \n'; }
[ "$(od -An -c -j 514 -N 4 "$bz" | tr -d ' \n')" = HdrS ] || die "$bz is not a bzImage (no HdrS header)"
setup_sects=$(rd_u 497 1)               # 0x1f1
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_off=$(rd_u 584 4)               # 0x248, relative to the protected-mode code
payload_len=$(rd_u 588 4)               # 0x24c
start=$(( (setup_sects + 1) * 512 + payload_off ))
magic=$(od -An -tx1 -j "$start" -N 6 "$bz" | tr -d ' \n')
payload() { dd if="$bz" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$payload_len" status=none; }
case $magic in
    fd377a585a00) payload | xz -dc --single-stream >"$WORK/vmlinux" ;;
    1f8b*)        payload | gzip -dc >"$WORK/vmlinux" 2>/dev/null || [ -s "$WORK/vmlinux" ] ;;
    28b52ffd*)    command -v zstd >/dev/null || die "kernel payload is zstd: install zstd"
                  payload | zstd -dc >"$WORK/vmlinux" ;;
    5d0000*)      payload | xz -dc --format=lzma >"$WORK/vmlinux" 2>/dev/null || [ -s "$WORK/vmlinux" ] ;;
    *) die "unknown kernel payload compression (magic $magic) in $bz" ;;
esac
[ "$(od -An -tx1 -N4 "$WORK/vmlinux" | tr -d ' \n')" = 7f454c46 ] || die "decompressed kernel is not an ELF file"
# mkpiggy appends the decompressed size as the payload's last 4 bytes (little endian).
want_size=$(od -An -tu4 -j "$((start + payload_len - 4))" -N 4 "$bz" | tr -d ' \n')
got_size=$(stat -c %s "$WORK/vmlinux")
[ "$want_size" = "$got_size" ] || die "decompressed kernel is $got_size bytes, the bzImage says $want_size"
# The PVH entry point is ELF note "Xen" type 18 (XEN_ELFNOTE_PHYS32_ENTRY): QEMU needs it for -kernel vmlinux.
readelf -n "$WORK/vmlinux" | grep -Eq 'Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*\(0x00000012\)' \
    || die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); the kernel needs CONFIG_PVH=y"
for opt in CONFIG_PVH CONFIG_ACPI_HOTPLUG_CPU CONFIG_HOTPLUG_CPU CONFIG_DEVTMPFS CONFIG_RD_GZIP CONFIG_SERIAL_8250_CONSOLE; do
    grep -qx "$opt=y" "$X/boot/config-$kver" || die "kernel config lacks $opt=y"
done

# ---- initramfs --------------------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,proc,sys,dev,run,tmp,etc/qemu,etc/acpi/PWRF,var,root}
ln -s ../run "$R/var/run"
cp "$X/bin/busybox" "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$R/bin/$applet"
done
ln -s ../bin/busybox "$R/sbin/hwclock"   # qemu-ga's guest-set-time runs /sbin/hwclock

agent_bin=$X/usr/sbin/qemu-ga
[ -x "$agent_bin" ] || die "qemu-ga not found in $AGENT_PKG"
cp "$agent_bin" "$R/usr/sbin/qemu-ga"

# Resolve a path inside the unpacked tree, following symlinks (absolute ones relative to $X).
resolve_in_x() {
    local p=$1 n=0 t
    while [ -L "$X$p" ]; do
        t=$(readlink "$X$p")
        case $t in /*) p=$t ;; *) p=$(dirname "$p")/$t ;; esac
        n=$((n + 1)); [ $n -lt 20 ] || return 1
    done
    [ -f "$X$p" ] && printf '%s\n' "$p"
}
libdirs="/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64"
declare -A copied=()
queue=("$R/usr/sbin/qemu-ga")
interp=$(readelf -l "$agent_bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ -n "$interp" ] || die "cannot read qemu-ga's ELF interpreter"
while [ ${#queue[@]} -gt 0 ]; do
    elf=${queue[0]}; queue=("${queue[@]:1}")
    for so in $(objdump -p "$elf" | awk '/NEEDED/ {print $2}') $(basename "$interp"); do
        [ -n "${copied[$so]:-}" ] && continue
        found=""
        for d in $libdirs; do
            if f=$(resolve_in_x "$d/$so"); then found=$f; break; fi
        done
        [ -n "$found" ] || die "shared library $so (needed by $(basename "$elf")) is in none of the unpacked packages: ${!pkg_ver[*]}"
        cp "$X$found" "$R/lib/x86_64-linux-gnu/$so"
        copied[$so]=$found
        queue+=("$R/lib/x86_64-linux-gnu/$so")
    done
done
ln -s ../lib/x86_64-linux-gnu/"$(basename "$interp")" "$R/lib64/$(basename "$interp")"
log "qemu-ga libraries: ${!copied[*]}"

# ACPI power button -> busybox acpid -> poweroff, so QMP system_powerdown stops the guest.
mods=""
for m in kernel/drivers/acpi/button.ko kernel/drivers/input/evdev.ko; do
    f=$X/lib/modules/$kver/$m
    [ -f "$f" ] || die "kernel module $m not found in $kernel_pkg"
    cp "$f" "$R/lib/"
    mods="$mods $(basename "$m")"
done

cat >"$R/etc/acpi/PWRF/00000080" <<'SH'
#!/bin/sh
# busybox acpid runs this on the ACPI power button (QMP system_powerdown).
exec /sbin/shutdown -h -P +0 "ACPI power button"
SH

cat >"$R/sbin/shutdown" <<'SH'
#!/bin/sh
# qemu-ga's guest-shutdown runs: /sbin/shutdown -h {-P|-H|-r} +0 "hypervisor initiated shutdown".
# There is no init system to signal: sync and call reboot(2) directly.
action=poweroff
for arg in "$@"; do
    case $arg in
        -r) action=reboot ;;
        -H) action=halt ;;
        -P) action=poweroff ;;
    esac
done
echo "corescale-guest: $action requested" >/dev/console
sync
exec /bin/$action -f
SH

cat >"$R/init" <<SH
#!/bin/sh
# corescale test guest, PID 1. Mounts the pseudo file systems, starts the guest agent on
# the second serial port (ttyS1) and idles. It never onlines hot-plugged CPUs itself:
# the node does that through the agent (guest-set-vcpus).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run/qemu-ga
exec </dev/console >/dev/console 2>&1
echo "corescale-guest: init started (uptime \$(cut -d' ' -f1 /proc/uptime)s)"
hostname corescale-guest
for m in$mods; do insmod /lib/\$m; done
acpid -c /etc/acpi -l /dev/null
echo "corescale-guest: kernel \$(uname -r) cpus online=\$(cat /sys/devices/system/cpu/online) present=\$(cat /sys/devices/system/cpu/present) possible=\$(cat /sys/devices/system/cpu/possible)"
[ -c /dev/ttyS1 ] || echo "corescale-guest: warning: /dev/ttyS1 missing (no second isa-serial?)"
(
    while :; do
        qemu-ga -m isa-serial -p /dev/ttyS1 -t /run/qemu-ga -f /run/qemu-ga.pid
        echo "corescale-guest: qemu-ga exited with \$?, restarting in 1s"
        rm -f /run/qemu-ga.pid
        sleep 1
    done
) &
# Ready once qemu-ga holds /dev/ttyS1 open (it writes no pid file unless it daemonizes).
i=0
while [ \$i -lt 200 ]; do
    for pid in \$(pidof qemu-ga); do
        for fd in /proc/\$pid/fd/*; do
            [ "\$(readlink \$fd)" = /dev/ttyS1 ] && break 3
        done
    done
    sleep 0.05
    i=\$((i + 1))
done
echo "corescale-guest: ready (uptime \$(cut -d' ' -f1 /proc/uptime)s)"
while :; do sleep 3600; done
SH
chmod 0755 "$R/init" "$R/sbin/shutdown" "$R/etc/acpi/PWRF/00000080"

# Deterministic archive: fixed mtimes, root ownership, sorted names.
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet --reproducible) \
    | gzip -n -9 >"$WORK/initramfs.cpio.gz"

# ---- publish ----------------------------------------------------------------------------
mv -f "$WORK/vmlinux" "$OUT/vmlinux.new" && mv -f "$OUT/vmlinux.new" "$OUT/vmlinux"
mv -f "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz.new" && mv -f "$OUT/initramfs.cpio.gz.new" "$OUT/initramfs.cpio.gz"
k_sha=$(sha256sum "$OUT/vmlinux" | cut -d' ' -f1)
i_sha=$(sha256sum "$OUT/initramfs.cpio.gz" | cut -d' ' -f1)
{
    printf '{\n'
    printf '  "kernel_release": "%s",\n' "$kver"
    printf '  "packages": {\n'
    n=0; total=${#pkg_ver[@]}
    for p in $(printf '%s\n' "${!pkg_ver[@]}" | sort); do
        n=$((n + 1)); sep=,; [ $n -lt "$total" ] || sep=
        printf '    "%s": "%s"%s\n' "$p" "${pkg_ver[$p]}" "$sep"
    done
    printf '  },\n'
    printf '  "outputs": {\n'
    printf '    "vmlinux": { "sha256": "%s", "bytes": %s },\n' "$k_sha" "$(stat -c %s "$OUT/vmlinux")"
    printf '    "initramfs.cpio.gz": { "sha256": "%s", "bytes": %s }\n' "$i_sha" "$(stat -c %s "$OUT/initramfs.cpio.gz")"
    printf '  },\n'
    printf '  "build_sh_sha256": "%s",\n' "$script_sha"
    printf '  "inputs_key": "%s"\n' "$inputs_key"
    printf '}\n'
} >"$manifest.new"
mv -f "$manifest.new" "$manifest"
log "built kernel $kver ($kernel_ver), agent $agent_ver, busybox $busybox_ver"
printf 'vmlinux=%s\ninitramfs=%s\nmanifest=%s\n' "$OUT/vmlinux" "$OUT/initramfs.cpio.gz" "$manifest"
