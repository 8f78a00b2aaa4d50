#!/usr/bin/env bash
# Boot a guest image once under QEMU/TCG and require its guest agent to answer, so that a
# broken image fails its build with the console's last lines instead of reaching the tests
# as a guest that never gets ready.
#
# Usage: node-vmm/guest/boot-check.sh --arch x86_64|ppc64le|aarch64 DIR
#   DIR holds vmlinux and initramfs.cpio.gz (build.sh's output, before it is published).
#   Prints the seconds the agent took to answer on stdout.
#
# The machine follows what the node's QEMU backend runs (node-vmm/src/machine.rs: q35 with
# the agent on a second isa-serial; pseries with VOF and the agent on virtio-serial), with
# two vCPU slots. The agent's chardev is a pipe pair, so plain bash talks to it: it sends
# 0xFF + guest-sync-delimited until the agent echoes the id, then guest-get-vcpus.
# Environment: CORESCALE_BOOT_CHECK_TIMEOUT (seconds, default 240).
set -euo pipefail

log() { printf 'guest/boot-check.sh: %s\n' "$*" >&2; }
die() { printf 'guest/boot-check.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { printf 'usage: %s --arch x86_64|ppc64le|aarch64 DIR\n' "$0" >&2; exit 2; }
ARCH=""
DIR=""
while [ $# -gt 0 ]; do
    case $1 in
        --arch) [ $# -ge 2 ] || usage; ARCH=$2; shift 2 ;;
        -*) usage ;;
        *) [ -z "$DIR" ] || usage; DIR=$1; shift ;;
    esac
done
[ -n "$ARCH" ] && [ -n "$DIR" ] || usage
TIMEOUT=${CORESCALE_BOOT_CHECK_TIMEOUT:-240}
for f in vmlinux initramfs.cpio.gz; do
    [ -f "$DIR/$f" ] || die "$DIR/$f is missing"
done

case $ARCH in
    x86_64)
        QEMU=qemu-system-x86_64
        MACHINE=(-machine q35 -cpu qemu64,vendor=GenuineIntel)
        CONSOLE=ttyS0
        console_args() { echo -serial "file:$1"; }
        AGENT_DEV=(-device isa-serial,chardev=qga0)
        ;;
    ppc64le)
        QEMU=qemu-system-ppc64
        MACHINE=(-machine pseries,x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off -cpu POWER9)
        CONSOLE=hvc0
        console_args() { echo -chardev "file,id=con0,path=$1" -device spapr-vty,chardev=con0,reg=0x71000001; }
        AGENT_DEV=(-device virtio-serial-pci,id=agent-serial
                   -device virtserialport,bus=agent-serial.0,chardev=qga0,name=org.qemu.guest_agent.0)
        ;;
    aarch64)
        QEMU=qemu-system-aarch64
        MACHINE=(-machine virt,gic-version=3 -cpu cortex-a72)
        CONSOLE=ttyAMA0
        console_args() { echo -serial "file:$1"; }
        AGENT_DEV=(-device virtio-serial-pci,id=agent-serial
                   -device virtserialport,bus=agent-serial.0,chardev=qga0,name=org.qemu.guest_agent.0)
        ;;
    *) die "--arch must be x86_64, ppc64le or aarch64, not '$ARCH'" ;;
esac
command -v "$QEMU" >/dev/null 2>&1 \
    || die "$QEMU is missing: every built image is booted once before it is cached (install QEMU 10: scripts/install-deps.sh)"

RUN=$(mktemp -d "${TMPDIR:-/tmp}/corescale-boot-check.XXXXXX")
qemu_pid=""
cleanup() {
    [ -z "$qemu_pid" ] || kill -9 "$qemu_pid" 2>/dev/null || true
    [ -z "$qemu_pid" ] || wait "$qemu_pid" 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT
mkfifo "$RUN/qga.in" "$RUN/qga.out"
console=$RUN/console.log
: >"$console"
fail() {
    log "$1"
    log "last console lines ($ARCH):"
    tail -n 40 "$console" | sed 's/^/    | /' >&2
    exit 1
}

# shellcheck disable=SC2046 # console_args prints words without spaces in them
"$QEMU" "${MACHINE[@]}" -accel tcg,thread=multi -m 256M -smp 1,maxcpus=2 \
    -kernel "$DIR/vmlinux" -initrd "$DIR/initramfs.cpio.gz" -append "console=$CONSOLE panic=-1" \
    -nodefaults -no-user-config -display none $(console_args "$console") \
    -chardev "pipe,id=qga0,path=$RUN/qga" "${AGENT_DEV[@]}" -no-reboot \
    >"$RUN/qemu.log" 2>&1 &
qemu_pid=$!
# Both ends opened read-write: neither open blocks, whatever QEMU has done yet.
exec 3<>"$RUN/qga.out" 4<>"$RUN/qga.in"

t0=$(date +%s%N)
deadline=$(( $(date +%s) + TIMEOUT ))
elapsed() { awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
# expect ID SECONDS: read lines until one is {"return": ID}, or SECONDS pass.
expect() {
    local until=$(( $(date +%s) + $2 )) line
    while [ "$(date +%s)" -lt "$until" ]; do
        if IFS= read -r -t 1 -u 3 line; then
            case $line in *"\"return\": $1}"*|*"\"return\":$1}"*) return 0 ;; esac
        fi
        kill -0 "$qemu_pid" 2>/dev/null || fail "QEMU exited: $(tail -n 5 "$RUN/qemu.log")"
        if grep -q 'runs without a guest agent' "$console"; then
            fail "the guest's init found no agent port"
        fi
    done
    return 1
}
id=$(( (RANDOM << 15 | RANDOM) + 1 ))
synced=0
while [ "$(date +%s)" -lt "$deadline" ]; do
    id=$((id + 1))
    printf '\xff{"execute": "guest-sync-delimited", "arguments": {"id": %d}}\n' "$id" >&4
    if expect "$id" 2; then synced=1; break; fi
done
[ "$synced" = 1 ] || fail "the guest agent did not answer within ${TIMEOUT}s"
# One real command: the agent must list the boot vCPU online.
printf '{"execute": "guest-get-vcpus"}\n' >&4
line=""
until=$(( $(date +%s) + 30 ))
while [ "$(date +%s)" -lt "$until" ]; do
    IFS= read -r -t 1 -u 3 line || continue
    case $line in *'"logical-id": 0'*) break ;; esac
done
case $line in
    *'"logical-id": 0'*'"online": true'*|*'"online": true'*'"logical-id": 0'*) ;;
    *) fail "guest-get-vcpus did not list vCPU 0 online (last reply: ${line:-none})" ;;
esac
grep -q 'corescale-guest: warning' "$console" && fail "the guest's init reported a warning"
log "$ARCH: the guest agent answered after $(elapsed) s"
elapsed
echo
