#!/usr/bin/env bash
# Boot build-disk.sh's Debian image once under QEMU/TCG and require the guest agent,
# cloud-init and sshd to answer, so a broken image fails its build with the console's last
# lines instead of reaching the tests.
#
# Usage: node-vmm/guest/boot-check-disk.sh [--arch x86_64] DIR
#   DIR holds disk.qcow2, vmlinux and initrd.img (build-disk.sh's output before publishing).
#   Prints "AGENT CLOUD_INIT SSHD" on stdout: the seconds from QEMU's start until the guest
#   agent answered, cloud-init finished (/var/lib/cloud/instance/boot-finished) and sshd
#   sent its banner.
#
# The base image is never written: the guest's disk is a qcow2 overlay in a temp dir. The
# NoCloud seed is a vfat image labelled cidata (mkfs.vfat + mcopy: no root mounts) with a
# runcmd that leaves a marker; the agent is on virtio-serial (org.qemu.guest_agent.0) at a
# unix socket; the network is QEMU's user network with 127.0.0.1:<free port> -> guest:22.
# When ssh and ssh-keygen are on the host, it also logs in as the default user (debian)
# with a key given through the seed and runs `sudo -n true`.
# Environment: CORESCALE_BOOT_CHECK_TIMEOUT (seconds for the whole boot, default 600).
set -euo pipefail

log() { printf 'guest/boot-check-disk.sh: %s\n' "$*" >&2; }
die() { printf 'guest/boot-check-disk.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { printf 'usage: %s [--arch x86_64] DIR\n' "$0" >&2; exit 2; }
ARCH=x86_64
DIR=""
while [ $# -gt 0 ]; do
    case $1 in
        --arch) [ $# -ge 2 ] || usage; ARCH=$2; shift 2 ;;
        -*) usage ;;
        *) [ -z "$DIR" ] || usage; DIR=$1; shift ;;
    esac
done
[ -n "$DIR" ] || usage
[ "$ARCH" = x86_64 ] || die "--arch $ARCH: only x86_64 disk images exist so far"
DIR=$(readlink -f "$DIR")
TIMEOUT=${CORESCALE_BOOT_CHECK_TIMEOUT:-600}
for f in disk.qcow2 vmlinux initrd.img; do
    [ -f "$DIR/$f" ] || die "$DIR/$f is missing"
done
export PATH=$PATH:/usr/sbin:/sbin
for tool in qemu-system-x86_64 qemu-img mkfs.vfat mcopy python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (scripts/install-deps.sh installs it)"
done

RUN=$(mktemp -d "${TMPDIR:-/tmp}/corescale-boot-check-disk.XXXXXX")
qemu_pid=""
cleanup() {
    [ -z "$qemu_pid" ] || kill -9 "$qemu_pid" 2>/dev/null || true
    [ -z "$qemu_pid" ] || wait "$qemu_pid" 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The overlay: every write of the guest lands here, the base image is opened read-only.
qemu-img create -q -f qcow2 -b "$DIR/disk.qcow2" -F qcow2 "$RUN/overlay.qcow2"

# The NoCloud seed.
instance=boot-check-$(date +%s)-$RANDOM
login_key=""
if command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; then
    ssh-keygen -q -t ed25519 -N '' -C corescale-boot-check -f "$RUN/id" >/dev/null
    login_key=$(cat "$RUN/id.pub")
fi
printf 'instance-id: %s\nlocal-hostname: corescale-boot-check\n' "$instance" >"$RUN/meta-data"
{
    printf '#cloud-config\n'
    [ -z "$login_key" ] || printf 'ssh_authorized_keys:\n  - %s\n' "$login_key"
    printf 'runcmd:\n  - [sh, -c, "echo %s > /run/corescale-boot-check"]\n' "$instance"
} >"$RUN/user-data"
mkfs.vfat -n cidata -C "$RUN/seed.img" 1024 >/dev/null 2>&1 || die "mkfs.vfat failed"
mcopy -i "$RUN/seed.img" "$RUN/meta-data" "$RUN/user-data" ::/ || die "mcopy failed"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
console=$RUN/console.log
: >"$console"
t0=$(date +%s.%N)
qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu qemu64 -m 1024 -smp 2 \
    -nodefaults -no-user-config -display none -no-reboot -serial "file:$console" \
    -kernel "$DIR/vmlinux" -initrd "$DIR/initrd.img" -append "console=ttyS0 root=/dev/vda rw" \
    -drive "file=$RUN/overlay.qcow2,format=qcow2,if=none,id=root,discard=unmap" -device virtio-blk-pci,drive=root \
    -drive "file=$RUN/seed.img,format=raw,if=none,id=seed,readonly=on" -device virtio-blk-pci,drive=seed \
    -netdev "user,id=net0,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=net0 \
    -device virtio-serial-pci,id=vser0 \
    -chardev "socket,id=qga0,path=$RUN/qga.sock,server=on,wait=off" \
    -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0 \
    >"$RUN/qemu.log" 2>&1 &
qemu_pid=$!

fail() {
    log "$1"
    log "last console lines:"
    tail -n 40 "$console" | sed 's/^/    | /' >&2
    exit 1
}
set +e
times=$(python3 - "$RUN/qga.sock" "$port" "$t0" "$TIMEOUT" "$instance" "$qemu_pid" 2>"$RUN/check.err" <<'PY'
import base64, json, os, select, socket, sys, time

sock_path, port, t0, timeout, instance, qemu_pid = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
deadline = t0 + timeout
def elapsed(): return time.time() - t0
def fail(msg):
    print(msg, file=sys.stderr); sys.exit(1)
def alive():
    try:
        os.kill(qemu_pid, 0)
        return True
    except OSError:
        return False

class Qga:
    """The agent on a virtio-serial port: what was sent before the guest opened the port
    arrives late, so every answer is matched by its guest-sync id."""
    def __init__(self):
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(sock_path); break
            except OSError:
                if time.time() > deadline or not alive(): fail("cannot connect to the agent's chardev socket")
                time.sleep(0.1)
        self.buf = b""; self.id = int(time.time()) % 100000 * 1000
    def send(self, obj, prefix=b""):
        self.s.sendall(prefix + json.dumps(obj).encode() + b"\n")
    def next_obj(self, until):
        dec = json.JSONDecoder()
        while True:
            text = self.buf.lstrip(b" \t\r\n\xff")
            nl = text.find(b"\n")
            if nl >= 0:
                self.buf = text[nl + 1:]
                try: return dec.decode(text[:nl].decode("utf-8", "replace"))
                except ValueError: continue
            self.buf = text
            left = until - time.time()
            if left <= 0: return None
            r, _, _ = select.select([self.s], [], [], min(left, 1.0))
            if r:
                chunk = self.s.recv(65536)
                if not chunk: fail("QEMU closed the agent's socket")
                self.buf += chunk
            elif not alive(): fail("QEMU exited")
    def sync(self, until, every=3.0):
        while time.time() < until:
            self.id += 1
            self.send({"execute": "guest-sync-delimited", "arguments": {"id": self.id}}, b"\xff")
            end = min(until, time.time() + every)
            while True:
                obj = self.next_obj(end)
                if obj is None: break
                if obj.get("return") == self.id: return True
        return False
    def run(self, cmd, args=None, t=30.0):
        if not self.sync(time.time() + t): fail(f"the agent stopped answering before {cmd}")
        req = {"execute": cmd}
        if args is not None: req["arguments"] = args
        self.send(req)
        obj = self.next_obj(time.time() + t)
        if obj is None: fail(f"no answer to {cmd}")
        return obj
    def read(self, path):
        r = self.run("guest-file-open", {"path": path, "mode": "r"})
        if "error" in r: return None
        h = r["return"]; data = b""
        while True:
            c = self.run("guest-file-read", {"handle": h, "count": 65536})["return"]
            data += base64.b64decode(c.get("buf-b64", ""))
            if c.get("eof") or not c.get("count"): break
        self.run("guest-file-close", {"handle": h})
        return data

q = Qga()
if not q.sync(deadline): fail(f"the guest agent did not answer within {timeout:.0f}s")
agent_s = elapsed()
print(f"the guest agent answered after {agent_s:.1f} s", file=sys.stderr)
if q.run("guest-ping").get("return") != {}: fail("guest-ping failed")
osinfo = q.run("guest-get-osinfo").get("return", {})
print(f"guest-get-osinfo: {osinfo.get('pretty-name')} (kernel {osinfo.get('kernel-release')})", file=sys.stderr)
if "Debian" not in str(osinfo.get("pretty-name")): fail(f"unexpected OS: {osinfo}")

# cloud-init's final stage writes boot-finished; sshd sends its banner on the forwarded
# port (QEMU accepts at once and closes while nothing listens in the guest). Both polled.
def banner():
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.settimeout(5)
            b = c.recv(256)
        return b if b.startswith(b"SSH-2.0-") else None
    except OSError:
        return None
ci_s = ssh_s = None
while ci_s is None or ssh_s is None:
    if time.time() > deadline:
        fail(f"within {timeout:.0f}s: cloud-init {'finished' if ci_s else 'did not finish'}, sshd {'answered' if ssh_s else 'did not answer'}")
    if ci_s is None and q.read("/var/lib/cloud/instance/boot-finished") is not None:
        ci_s = elapsed()
        print(f"cloud-init finished after {ci_s:.1f} s", file=sys.stderr)
    if ssh_s is None:
        b = banner()
        if b:
            ssh_s = elapsed()
            print(f"sshd answered after {ssh_s:.1f} s: {b.decode(errors='replace').strip()}", file=sys.stderr)
    time.sleep(0.5)
# user-data's runcmd wrote the marker; cloud-init reports no error; the hostname is the seed's.
marker = (q.read("/run/corescale-boot-check") or b"").decode().strip()
if marker != instance: fail(f"user-data's runcmd marker is {marker!r}, not {instance!r}: the NoCloud seed was not used")
result = json.loads(q.read("/run/cloud-init/result.json") or b"{}")
errors = result.get("v1", {}).get("errors")
if errors: fail(f"cloud-init reported errors: {errors}")
host = q.run("guest-get-host-name").get("return", {}).get("host-name")
if host != "corescale-boot-check": fail(f"hostname is {host!r}, not the seed's local-hostname")
print(f"{agent_s:.1f} {ci_s:.1f} {ssh_s:.1f}")
PY
)
rc=$?
set -e
sed 's/^/    /' "$RUN/check.err" >&2
[ "$rc" = 0 ] || fail "the boot check failed: $(tail -n 1 "$RUN/check.err")"

if [ -n "$login_key" ]; then
    # The default user logs in with the seed's key and may sudo.
    who=$(timeout 120 ssh -i "$RUN/id" -p "$port" -o BatchMode=yes -o StrictHostKeyChecking=no \
          -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=30 \
          debian@127.0.0.1 'sudo -n true && id -un') || fail "ssh login as debian (with sudo) failed"
    [ "$who" = debian ] || fail "ssh login ran as '$who', not debian"
    log "ssh debian@127.0.0.1 -p $port: logged in, sudo works"
fi
# The serial getty on ttyS0 prompts with the hostname cloud-init set.
i=0
until grep -q 'corescale-boot-check login:' "$console"; do
    i=$((i + 1))
    [ "$i" -le 60 ] || fail "no login prompt from the serial getty on ttyS0 (with the seed's hostname)"
    sleep 1
done
if grep -Eq 'Failed to start|FAILED' "$console"; then
    grep -E 'Failed to start|FAILED' "$console" | sed 's/^/    | /' >&2
    fail "a unit failed during boot"
fi
log "x86_64: agent $(cut -d' ' -f1 <<<"$times") s, cloud-init finished $(cut -d' ' -f2 <<<"$times") s, sshd $(cut -d' ' -f3 <<<"$times") s after QEMU started"
printf '%s\n' "$times"
