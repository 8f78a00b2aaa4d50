#!/usr/bin/env bash
# Build corescale's test/default guest image from Debian 12 (bookworm) packages only:
#   vmlinux            uncompressed kernel from linux-image-<flavour> (Debian 12, 6.1)
#   initramfs.cpio.gz  busybox-static + qemu-guest-agent (with its shared libraries) + /init
#   manifest.json      kernel release, package versions, sha256 of the outputs, boot check
#
# Usage: node-vmm/guest/build.sh [--arch x86_64|ppc64le|aarch64] [--no-boot-check] [OUTDIR]
#   --arch    x86_64 (default): linux-image-amd64's bzImage payload (PVH entry) for q35;
#             ppc64le: linux-image-powerpc64le's vmlinux for QEMU's pseries machine
#             (packages of the foreign architecture ppc64el; see below);
#             aarch64: linux-image-arm64's Image (decompressed) for QEMU's virt machine
#   OUTDIR    defaults to ${CORESCALE_CACHE:-$HOME/.cache/corescale}/guest/<arch>
#   --no-boot-check  skip booting the new image (boot-check.sh) before publishing it: only
#             for builders without QEMU whose next step checks it (the Dockerfile's guest
#             stage; its node-vmm stage runs boot-check.sh)
#
# Kernel modules the guest loads (x86_64: the ACPI power button; ppc64le: virtio-serial for
# the agent) are named here; which files they are, what they depend on and the load order
# come from depmod run on the kernel package itself, so a Debian kernel update cannot
# break them. Every new image is booted once under QEMU/TCG (boot-check.sh) and published
# only when its guest agent answers; the build ends with one line that says what it holds.
#
# Nothing is installed into the host: packages are fetched with `apt-get download` and
# unpacked with `dpkg -x` into a scratch directory. The build is skipped when the outputs
# exist, their sha256 match the manifest and the manifest's inputs (package versions and
# this script's own hash) match what would be built now. `apt-get update` runs only when
# the package lists lack a package or a download fails.
#
# x86_64 uses the host's apt lists. ppc64le keeps its own ppc64el-only apt lists under
# ${CORESCALE_CACHE:-$HOME/.cache/corescale}/apt-ppc64el (apt options point apt's lists,
# cache and dpkg status there), so the host's dpkg architectures stay untouched.
#
# x86_64: the guest's /init does NOT online hot-plugged CPUs: the node onlines them through
# the guest agent (guest-set-vcpus), which is what corescale tests. ppc64le: the pseries
# guest kernel onlines a hot-added core's threads itself (DLPAR); /init does nothing for it.
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
CACHE_DIR=${CORESCALE_CACHE:-$HOME/.cache/corescale}
usage() { printf 'usage: %s [--arch x86_64|ppc64le|aarch64] [--no-boot-check] [OUTDIR]\n' "$0" >&2; exit 2; }
ARCH=x86_64
OUT=""
BOOT_CHECK=1
while [ $# -gt 0 ]; do
    case $1 in
        --arch) [ $# -ge 2 ] || usage; ARCH=$2; shift 2 ;;
        --arch=*) ARCH=${1#--arch=}; shift ;;
        --no-boot-check) BOOT_CHECK=0; shift ;;
        -h|--help) usage ;;
        -*) printf 'guest/build.sh: error: unknown option %s\n' "$1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
    esac
done
OUT=${OUT:-$CACHE_DIR/guest/$ARCH}
# Debian 12 ships 6.1; bookworm-backports carries newer kernels that we do not want.
KERNEL_SERIES=${CORESCALE_GUEST_KERNEL_SERIES:-6.1}
AGENT_PKG=qemu-guest-agent
BUSYBOX_PKG=busybox-static

log() { printf 'guest/build.sh: %s\n' "$*" >&2; }
die() { printf 'guest/build.sh: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=lib.sh
. "$(dirname "$SCRIPT_PATH")/lib.sh"

# Per-architecture facts: Debian's name for it, the kernel flavour, the multiarch triplet,
# the guest agent's tty, and apt options (empty: the host's own apt setup).
APT_OPTS=()
case $ARCH in
    x86_64)
        DEB_ARCH=amd64; FLAVOUR=amd64; TRIPLET=x86_64-linux-gnu
        AGENT_METHOD=isa-serial; AGENT_PORT="the second serial port (ttyS1)"
        AGENT_FIND='[ -c /dev/ttyS1 ] && port=/dev/ttyS1'
        AGENT_MISSING="/dev/ttyS1 missing (no second isa-serial?)"
        # ACPI power button -> busybox acpid -> poweroff, so QMP system_powerdown stops the guest.
        GUEST_MODULES="button evdev"
        KERNEL_CONFIG="CONFIG_PVH CONFIG_ACPI_HOTPLUG_CPU CONFIG_HOTPLUG_CPU CONFIG_DEVTMPFS CONFIG_RD_GZIP CONFIG_SERIAL_8250_CONSOLE"
        ;;
    ppc64le)
        DEB_ARCH=ppc64el; FLAVOUR=powerpc64le; TRIPLET=powerpc64le-linux-gnu
        # The agent talks over virtio-serial, not a second spapr-vty: an hvc port echoes
        # in its default (cooked) mode until the agent makes it raw, and the echo of what
        # the node sent while the guest booted drains slowly (16 bytes per hypervisor
        # call), interleaved with the agent's replies: replies were lost. A virtio port is
        # not a tty. The modules are loaded by /init; the port is found by its name.
        AGENT_METHOD=virtio-serial
        AGENT_PORT="the virtio-serial port org.qemu.guest_agent.0"
        AGENT_MISSING="no virtio-serial port named org.qemu.guest_agent.0 (QEMU: -device virtio-serial-pci -device virtserialport,name=org.qemu.guest_agent.0)"
        # The modules the port needs; their dependencies and order come from the kernel's
        # own modules.dep (see modules_in_load_order), never from a list written here.
        GUEST_MODULES="virtio_pci virtio_console"
        AGENT_FIND='i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
    for n in /sys/class/virtio-ports/*/name; do
        [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename "$(dirname "$n")")
    done
    [ -n "$port" ] || sleep 0.02
    i=$((i + 1))
done'
        # pseries CPU hot-plug is DLPAR driven by RTAS hot-plug events: hotplug-cpu.o needs
        # HOTPLUG_CPU, the event and device-tree paths need PPC_RTAS and OF_DYNAMIC; the
        # console is spapr-vty (hvc_vio, HVC_CONSOLE); the agent's port virtio-serial over
        # PCI (modules), which needs PCI_MSI-capable PCI (PPC_PSERIES' PHB).
        KERNEL_CONFIG="CONFIG_PPC_PSERIES CONFIG_SMP CONFIG_HOTPLUG_CPU CONFIG_PPC_RTAS CONFIG_OF_DYNAMIC CONFIG_HVC_CONSOLE CONFIG_DEVTMPFS CONFIG_RD_GZIP CONFIG_PCI"
        APT_DIR=$CACHE_DIR/apt-$DEB_ARCH
        APT_OPTS=(-o "APT::Architectures::=$DEB_ARCH" -o "APT::Architecture=$DEB_ARCH"
                  -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache"
                  -o "Dir::State::status=/dev/null")
        mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
        ;;
    aarch64)
        # QEMU's virt machine, booted from the device tree (no firmware): the console is
        # the PL011 (ttyAMA0), the agent a virtio-serial port as on POWER (virtio over
        # the generic PCIe host bridge). virt cannot hot-plug CPUs: every CPU is present
        # from boot and the node onlines them (resizeMethod GuestOnline).
        DEB_ARCH=arm64; FLAVOUR=arm64; TRIPLET=aarch64-linux-gnu
        AGENT_METHOD=virtio-serial
        AGENT_PORT="the virtio-serial port org.qemu.guest_agent.0"
        AGENT_MISSING="no virtio-serial port named org.qemu.guest_agent.0 (QEMU: -device virtio-serial-pci -device virtserialport,name=org.qemu.guest_agent.0)"
        GUEST_MODULES="virtio_pci virtio_console"
        AGENT_FIND='i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
    for n in /sys/class/virtio-ports/*/name; do
        [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename "$(dirname "$n")")
    done
    [ -n "$port" ] || sleep 0.02
    i=$((i + 1))
done'
        KERNEL_CONFIG="CONFIG_SMP CONFIG_HOTPLUG_CPU CONFIG_DEVTMPFS CONFIG_RD_GZIP CONFIG_SERIAL_AMBA_PL011_CONSOLE CONFIG_PCI_HOST_GENERIC CONFIG_ARM_GIC_V3"
        APT_DIR=$CACHE_DIR/apt-$DEB_ARCH
        APT_OPTS=(-o "APT::Architectures::=$DEB_ARCH" -o "APT::Architecture=$DEB_ARCH"
                  -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache"
                  -o "Dir::State::status=/dev/null")
        mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
        ;;
    *) die "--arch must be x86_64, ppc64le or aarch64, not '$ARCH'" ;;
esac
META_PKG=linux-image-$FLAVOUR

export PATH=$PATH:/usr/sbin:/sbin   # depmod
for tool in apt-get apt-cache dpkg dpkg-deb cpio gzip xz od readelf sha256sum find sort depmod; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' is missing (apt-get install apt dpkg cpio gzip xz-utils coreutils binutils findutils kmod)"
done

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        apt_updated=1
        if [ ${#APT_OPTS[@]} -eq 0 ]; then
            log "running apt-get update"
            apt-get update -qq >&2 || die "apt-get update failed"
        else
            # The host's sources are reused for $DEB_ARCH: some of them carry no such index
            # (third-party repositories) or fail now and then; bookworm main is what counts.
            log "running apt-get update for $DEB_ARCH (lists in $APT_DIR)"
            apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root update -qq >&2 \
                || log "apt-get update for $DEB_ARCH reported errors (checked below)"
            compgen -G "$APT_DIR/lists/*_dists_bookworm_main_binary-${DEB_ARCH}_Packages*" >/dev/null \
                || die "apt-get update fetched no bookworm main index for $DEB_ARCH (is a Debian 12 bookworm source configured?)"
        fi
    fi
}

# candidate_versions PKG... -> "PKG VERSION" lines for the versions apt would download
# (one apt-cache call: each call costs about half a second).
candidate_versions() {
    apt-cache "${APT_OPTS[@]}" policy "$@" 2>/dev/null | awk '
        /^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1) }
        /^  Candidate:/ { if ($2 != "(none)") print pkg, $2 }'
}

# kernel_meta_version -> highest linux-image-<flavour> version in the KERNEL_SERIES series
kernel_meta_version() {
    apt-cache "${APT_OPTS[@]}" madison "$META_PKG" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' \
        | grep -E "^${KERNEL_SERIES//./\\.}\." | sort -V | tail -n1 || true
}

meta_ver=$(kernel_meta_version)
if [ -z "$meta_ver" ]; then
    apt_update_once
    meta_ver=$(kernel_meta_version)
fi
[ -n "$meta_ver" ] || die "no $META_PKG version ${KERNEL_SERIES}.x in the apt package lists (is a Debian 12 bookworm source configured?)"

# The metapackage depends on exactly one linux-image-<abi>-<flavour> package of the same version.
kernel_pkg=$(apt-cache "${APT_OPTS[@]}" show "$META_PKG=$meta_ver" | awk -F': ' '/^Depends:/ {print $2; exit}' \
    | tr ',' '\n' | sed -E 's/^ +//; s/ .*//' | grep -E "^linux-image-[0-9].*-$FLAVOUR\$" | head -n1)
[ -n "$kernel_pkg" ] || die "cannot find the kernel package that $META_PKG=$meta_ver depends on"
kernel_ver=$meta_ver

# The agent's runtime dependency closure (Depends only; shared libraries are then resolved
# from the unpacked files, so an unneeded package costs only a download).
closure() {
    apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
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
pkg_ver[$META_PKG]=$meta_ver
for p in "$AGENT_PKG" "$BUSYBOX_PKG" $lib_pkgs; do
    [ -n "${cand[$p]:-}" ] || die "package $p has no installable version in the apt package lists"
    pkg_ver[$p]=${cand[$p]}
done
agent_ver=${pkg_ver[$AGENT_PKG]}


script_sha=$(cat "$SCRIPT_PATH" "$(dirname "$SCRIPT_PATH")/boot-check.sh" "$(dirname "$SCRIPT_PATH")/lib.sh" | sha256sum | cut -d' ' -f1)
# One line per input; the manifest stores the same text, so comparing it decides a rebuild.
inputs_key=$( { for p in "${!pkg_ver[@]}"; do printf '%s=%s\n' "$p" "${pkg_ver[$p]}"; done
               printf 'build.sh=%s\n' "$script_sha"; } | sort | tr '\n' ';')

manifest=$OUT/manifest.json
# One line from a manifest: what the image holds (make guest prints it).
summary() {
    local m=$1
    printf '%s: kernel %s (%s %s), qemu-ga %s, busybox %s, boot check %s s\n' "$ARCH" \
        "$(sed -n 's/^ *"kernel_release": "\(.*\)",$/\1/p' "$m")" "$META_PKG" \
        "$(sed -n "s/^ *\"$META_PKG\": \"\(.*\)\",\{0,1\}\$/\1/p" "$m")" \
        "$(sed -n "s/^ *\"$AGENT_PKG\": \"\(.*\)\",\{0,1\}\$/\1/p" "$m")" \
        "$(sed -n "s/^ *\"$BUSYBOX_PKG\": \"\(.*\)\",\{0,1\}\$/\1/p" "$m")" \
        "$(sed -n 's/^ *"boot_check_seconds": \(.*\),$/\1/p' "$m")"
}
if [ "$BOOT_CHECK" = 1 ] && [ -f "$manifest" ] && grep -q '"boot_check_seconds": null' "$manifest"; then
    log "the cached image was never booted (built with --no-boot-check): rebuilding"
elif [ -f "$manifest" ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
    old_key=$(sed -n 's/^ *"inputs_key": "\(.*\)",\{0,1\}$/\1/p' "$manifest")
    old_k_sha=$(sed -n 's/^ *"vmlinux": { *"sha256": "\([0-9a-f]*\)".*/\1/p' "$manifest")
    old_i_sha=$(sed -n 's/^ *"initramfs.cpio.gz": { *"sha256": "\([0-9a-f]*\)".*/\1/p' "$manifest")
    if [ "$old_key" = "$inputs_key" ] \
        && [ "$old_k_sha" = "$(sha256sum "$OUT/vmlinux" | cut -d' ' -f1)" ] \
        && [ "$old_i_sha" = "$(sha256sum "$OUT/initramfs.cpio.gz" | cut -d' ' -f1)" ]; then
        log "up to date"
        summary "$manifest"
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
    [ "$p" = "$META_PKG" ] && continue   # metapackage: nothing to unpack
    specs+=("$p=${pkg_ver[$p]}")
done
download() { (cd "$WORK/debs" && apt-get -q "${APT_OPTS[@]}" -o APT::Sandbox::User=root download "${specs[@]}" >&2); }
log "downloading ${#specs[@]} packages"
if ! download; then
    apt_update_once
    download || die "apt-get download failed for: ${specs[*]}"
fi
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$WORK/x"
done
X=$WORK/x

# ---- vmlinux ------------------------------------------------------------------------------
kver=${kernel_pkg#linux-image-}

# x86_64: the compressed payload of the bzImage, decompressed (lib.sh).
kernel_x86_64() { extract_pvh_vmlinux "$X/boot/vmlinuz-$kver" "$WORK/vmlinux"; }

# ppc64le: the package ships the uncompressed ELF kernel that QEMU's pseries loads itself.
kernel_ppc64le() {
    local k=$X/boot/vmlinux-$kver
    [ -f "$k" ] || die "kernel image $k not found in $kernel_pkg"
    readelf -h "$k" | grep -Eq 'Machine:[[:space:]]+PowerPC64' \
        || die "$k is not a PowerPC64 ELF kernel"
    readelf -h "$k" | grep -q 'little endian' || die "$k is not little endian (ppc64le)"
    cp "$k" "$WORK/vmlinux"
}

# aarch64: the package's vmlinuz is a gzip-compressed arm64 Image; QEMU's virt loads the
# Image itself (no firmware), decompressed here once rather than at every boot.
kernel_aarch64() {
    local k=$X/boot/vmlinuz-$kver
    [ -f "$k" ] || die "kernel image $k not found in $kernel_pkg"
    case $(od -An -tx1 -N 2 "$k" | tr -d ' \n') in
        1f8b) gzip -dc "$k" >"$WORK/vmlinux" ;;
        *) cp "$k" "$WORK/vmlinux" ;;
    esac
    # The arm64 Image header's magic "ARM\x64" at offset 0x38.
    [ "$(od -An -tx1 -j 56 -N 4 "$WORK/vmlinux" | tr -d ' \n')" = 41524d64 ] \
        || die "$k is not an arm64 Image (no ARM\\x64 magic)"
}

kernel_$ARCH
for opt in $KERNEL_CONFIG; do
    grep -qx "$opt=y" "$X/boot/config-$kver" || die "kernel config lacks $opt=y"
done

# ---- initramfs --------------------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/$TRIPLET,lib64,proc,sys,dev,run,tmp,etc/qemu,var,root}
[ "$ARCH" != x86_64 ] || mkdir -p "$R/etc/acpi/PWRF"
ln -s ../run "$R/var/run"
cp "$X/bin/busybox" "$R/bin/busybox"
# The applet names, read from the binary (it may not run on this host): busybox keeps them
# as one sorted run of NUL-terminated strings starting "[", "[[" and ending in an empty one.
busybox_applets() {
    # (awk reads to the end: an early exit would kill tr with SIGPIPE under pipefail)
    tr '\0' '\n' <"$1" | awk 'done {next} p && $0 == "" {done = 1; next} p {print} prev == "[" && $0 == "[[" {p = 1; print "["; print "[["} {prev = $0}'
}
applets=$(busybox_applets "$R/bin/busybox")
for a in sh mount poweroff sleep pidof; do
    grep -qx "$a" <<<"$applets" || die "cannot read busybox's applet list from $BUSYBOX_PKG (no '$a' found)"
done
for applet in $applets; do
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
libdirs="/lib/$TRIPLET /usr/lib/$TRIPLET /lib64"
declare -A copied=()
queue=("$R/usr/sbin/qemu-ga")
interp=$(readelf -l "$agent_bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ -n "$interp" ] || die "cannot read qemu-ga's ELF interpreter"
while [ ${#queue[@]} -gt 0 ]; do
    elf=${queue[0]}; queue=("${queue[@]:1}")
    # readelf, not objdump: the host's objdump may not know the guest's ELF machine.
    for so in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p') $(basename "$interp"); do
        [ -n "${copied[$so]:-}" ] && continue
        found=""
        for d in $libdirs; do
            if f=$(resolve_in_x "$d/$so"); then found=$f; break; fi
        done
        # Elsewhere in the packages (a library directory this script does not know).
        if [ -z "$found" ]; then
            f=$(cd "$X" && find . -name "$so" \( -type f -o -type l \) | LC_ALL=C sort | head -n1)
            [ -z "$f" ] || found=$(resolve_in_x "${f#.}") || found=""
        fi
        [ -n "$found" ] || die "shared library $so (needed by $(basename "$elf")) is in none of the unpacked packages: ${!pkg_ver[*]}"
        cp "$X$found" "$R/lib/$TRIPLET/$so"
        copied[$so]=$found
        queue+=("$R/lib/$TRIPLET/$so")
    done
done
# The interpreter at the path the binary names (a symlink to the copy in /lib/<triplet>).
if [ "$interp" != "/lib/$TRIPLET/$(basename "$interp")" ]; then
    mkdir -p "$R$(dirname "$interp")"
    ln -sf "/lib/$TRIPLET/$(basename "$interp")" "$R$interp"
fi
log "qemu-ga libraries: ${!copied[*]}"

# ---- kernel modules ----------------------------------------------------------------------
# Debian's kernel packages ship no modules.dep (the package's postinst runs depmod): run
# depmod on the unpacked tree, then follow what it wrote. A security update that moves a
# symbol between modules (6.1.192 made virtio.ko depend on virtio_ring.ko) changes the order
# here, not this script.
MODDIR=$X/lib/modules/$kver
[ -d "$MODDIR" ] || die "$kernel_pkg has no /lib/modules/$kver"
depmod -b "$X" "$kver" || die "depmod failed on the modules of $kernel_pkg"
[ -s "$MODDIR/modules.dep" ] || die "depmod wrote no $MODDIR/modules.dep"

# modules_in_load_order NAME... -> the paths (relative to /lib/modules/<kver>) of NAME and
# of everything it depends on, each after its dependencies, from modules.dep. A module
# built into the kernel (modules.builtin) needs nothing; one in neither list is an error.
declare -A dep_of=() path_of=() visited=()
while IFS= read -r line; do
    mod_path=${line%%:*}
    name=$(basename "$mod_path"); name=${name%%.ko*}; name=${name//-/_}
    path_of[$name]=$mod_path
    dep_of[$mod_path]=${line#*:}
done <"$MODDIR/modules.dep"
load_order=()
visit() {
    local p=$1 d
    [ -z "${visited[$p]:-}" ] || return 0
    visited[$p]=1
    for d in ${dep_of[$p]}; do visit "$d"; done
    load_order+=("$p")
}
modules_in_load_order() {
    local m key
    for m in "$@"; do
        key=${m//-/_}
        if [ -n "${path_of[$key]:-}" ]; then
            visit "${path_of[$key]}"
        elif grep -Eq "/${m}\.ko(\.[a-z]+)?\$" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "module $m is built into $kver"
        else
            die "module $m is neither in modules.dep nor in modules.builtin of $kver"
        fi
    done
}
modules_in_load_order $GUEST_MODULES
# Copy them to the same paths in the guest, uncompressed (busybox insmod reads plain ELF),
# and the order into /lib/modules/load-order for /init.
: >"$R/lib/modules.load-order"
for p in "${load_order[@]}"; do
    dst=${p%.ko*}.ko
    mkdir -p "$(dirname "$R/lib/modules/$kver/$dst")"
    case $p in
        *.ko)     cp "$MODDIR/$p" "$R/lib/modules/$kver/$dst" ;;
        *.ko.xz)  xz -dc "$MODDIR/$p" >"$R/lib/modules/$kver/$dst" ;;
        *.ko.gz)  gzip -dc "$MODDIR/$p" >"$R/lib/modules/$kver/$dst" ;;
        *.ko.zst) command -v zstd >/dev/null || die "module $p is zstd-compressed: install zstd"
                  zstd -qdc "$MODDIR/$p" >"$R/lib/modules/$kver/$dst" ;;
        *) die "unknown module file type: $p" ;;
    esac
    printf '/lib/modules/%s/%s\n' "$kver" "$dst" >>"$R/lib/modules.load-order"
done
log "guest modules in load order: ${load_order[*]:-(none)}"

# How QMP system_powerdown reaches the guest, and the matching /init lines (empty: none).
power_init=""
power_files=()
power_x86_64() {
    # ACPI power button (button.ko, evdev.ko above) -> busybox acpid -> poweroff.
    cat >"$R/etc/acpi/PWRF/00000080" <<'SH'
#!/bin/sh
# busybox acpid runs this on the ACPI power button (QMP system_powerdown).
exec /sbin/shutdown -h -P +0 "ACPI power button"
SH
    power_init="acpid -c /etc/acpi -l /dev/null
"
    power_files=("$R/etc/acpi/PWRF/00000080")
}
power_ppc64le() {
    # pseries: system_powerdown raises an RTAS EPOW event; the kernel's handler calls
    # orderly_poweroff(), which runs /sbin/poweroff (and powers off by force if that fails).
    cat >"$R/sbin/poweroff" <<'SH'
#!/bin/sh
# The kernel runs this on an EPOW power-off request (QMP system_powerdown on pseries).
echo "corescale-guest: poweroff requested (EPOW)" >/dev/console
sync
exec /bin/poweroff -f
SH
    power_files=("$R/sbin/poweroff")
}
power_aarch64() {
    # virt without firmware has no ACPI power button; the node stops the guest through
    # the agent (guest-shutdown) and, failing that, kills QEMU after its grace.
    :
}
power_$ARCH

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

case $ARCH in
    x86_64) cpu_note="It never onlines hot-plugged CPUs itself:
# the node does that through the agent (guest-set-vcpus)." ;;
    *) cpu_note="It never onlines hot-plugged CPUs itself
# (a pseries kernel onlines a hot-added core's threads by itself)." ;;
esac
{
    cat <<SH
#!/bin/sh
# corescale test guest, PID 1. Mounts the pseudo file systems, loads the kernel modules of
# /lib/modules.load-order, starts the guest agent on $AGENT_PORT and runs a shell on the
# console.
# $cpu_note
#
# The kernel command line's corescale.agent= chooses how the agent behaves, so tests can
# play every kind of guest with one image: on (default), off (no agent, as most cloud
# images), delay=N (starts N seconds late), silent (the port is held open and never read),
# garbage (the port carries garbage and never an answer), flap (the agent is killed and
# restarted every second). A missing port is reported once and the guest runs without one.
AGENT_METHOD=$AGENT_METHOD
AGENT_MISSING="$AGENT_MISSING"
find_agent_port() {
$AGENT_FIND
}
SH
    cat <<'SH'
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run/qemu-ga
exec </dev/console >/dev/console 2>&1
say() { echo "corescale-guest: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
say "init started (uptime $(uptime_s)s)"
hostname corescale-guest
while read -r m; do
    insmod "$m" || say "warning: cannot load $m"
done </lib/modules.load-order
SH
    printf '%s' "$power_init"
    cat <<'SH'
say "kernel $(uname -r) cpus online=$(cat /sys/devices/system/cpu/online) present=$(cat /sys/devices/system/cpu/present) possible=$(cat /sys/devices/system/cpu/possible)"
agent=on
for w in $(cat /proc/cmdline); do
    case $w in corescale.agent=*) agent=${w#corescale.agent=} ;; esac
done
port=""
find_agent_port
if [ -z "$port" ]; then
    say "warning: $AGENT_MISSING: this guest runs without a guest agent"
    agent=off
fi
run_agent() { qemu-ga -m "$AGENT_METHOD" -p "$port" -t /run/qemu-ga -f /run/qemu-ga.pid; }
agent_loop() {
    while :; do
        run_agent
        say "qemu-ga exited with $?, restarting in 1s"
        rm -f /run/qemu-ga.pid
        sleep 1
    done
}
case $agent in
    on) agent_loop & ;;
    delay=*)
        n=${agent#delay=}
        say "the guest agent starts in ${n}s (corescale.agent=$agent)"
        (sleep "$n" && say "starting the guest agent" && agent_loop) & ;;
    off) say "no guest agent (corescale.agent=off)" ;;
    silent)
        say "the agent port is held open and never read (corescale.agent=silent)"
        stty -F "$port" raw -echo 2>/dev/null
        sleep 2147483647 <"$port" & ;;
    garbage)
        say "the agent port carries garbage (corescale.agent=garbage)"
        stty -F "$port" raw -echo 2>/dev/null
        (while :; do
            printf '%s\n' 'corescale garbage {"return": [1, ' '{"return": 1}' '{"id": 7, "return": {}}' 'not json'
            sleep 0.05
        done >"$port" 2>/dev/null) & ;;
    flap)
        say "the guest agent restarts every second (corescale.agent=flap)"
        (while :; do
            run_agent &
            p=$!
            sleep 1
            kill "$p" 2>/dev/null
            wait "$p"
        done) & ;;
    *) say "warning: unknown corescale.agent=$agent: no guest agent" ;;
esac
if [ "$agent" = on ]; then
    # Ready once qemu-ga holds the port open (it writes no pid file unless it daemonizes).
    i=0
    while [ $i -lt 200 ]; do
        for pid in $(pidof qemu-ga); do
            for fd in /proc/$pid/fd/*; do
                [ "$(readlink "$fd")" = "$port" ] && break 3
            done
        done
        sleep 0.05
        i=$((i + 1))
    done
fi
say "ready (uptime $(uptime_s)s)"
# The console is a shell for whoever attaches to it on the node (the VM's console socket,
# root only): operators look around, tests start load and read /proc/stat. Nothing is
# typed into it otherwise, so it waits. It comes back if someone types `exit`.
while :; do
    sh -i
    sleep 1
done
SH
} >"$R/init"
chmod 0755 "$R/init" "$R/sbin/shutdown" "${power_files[@]}"

# Deterministic archive: fixed mtimes, root ownership, sorted names.
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet --reproducible) \
    | gzip -n -9 >"$WORK/initramfs.cpio.gz"

# ---- check ------------------------------------------------------------------------------
# Boot it once: an image whose agent does not answer never reaches the cache.
boot_check_s=null
if [ "$BOOT_CHECK" = 1 ]; then
    log "booting the new $ARCH image once (its guest agent must answer)"
    boot_check_s=$(bash "$(dirname "$SCRIPT_PATH")/boot-check.sh" --arch "$ARCH" "$WORK") \
        || die "the $ARCH image built from $kernel_pkg $kernel_ver failed its boot check (above); nothing was cached"
fi

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
    printf '  "agent_version": "%s",\n' "$agent_ver"
    printf '  "boot_check_seconds": %s,\n' "$boot_check_s"
    printf '  "build_sh_sha256": "%s",\n' "$script_sha"
    printf '  "inputs_key": "%s"\n' "$inputs_key"
    printf '}\n'
} >"$manifest.new"
mv -f "$manifest.new" "$manifest"
log "built"
summary "$manifest"
printf 'vmlinux=%s\ninitramfs=%s\nmanifest=%s\n' "$OUT/vmlinux" "$OUT/initramfs.cpio.gz" "$manifest"
