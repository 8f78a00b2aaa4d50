#!/usr/bin/env python3
"""End-to-end smoke test of vCPU hot-plug with corescale's guest image under QEMU/TCG.

Boots real QEMU guests with the recipe documented in README.md, drives them over QMP
(unix socket) and the QEMU guest agent (QGA, on an isa-serial port), and proves the
sequence the node-vmm QEMU backend relies on:

  device_add -> ACPI_DEVICE_OST (insert) -> agent sees the CPU offline -> guest-set-vcpus
  onlines it -> topology read back through guest-file-* -> device_del -> ACPI_DEVICE_OST
  (eject) -> the CPU is gone from the agent and from query-cpus-fast.

Python 3 standard library only. Exits non-zero on the first failed check. Every QMP/QGA
message is written to a JSON-lines transcript (--transcript) so the exact protocol can be
read back. Timings of every phase are printed.

With --arch ppc64le it boots the pseries guest (build.sh --arch ppc64le) under
qemu-system-ppc64 and proves the POWER sequence instead: device_add of a whole core ->
the guest kernel onlines its threads by itself (seen through the agent on virtio-serial)
-> the logical CPUs map to core-id/thread through physical_id and topology/core_id ->
device_del -> DEVICE_DELETED per thread, then for the core.

Usage: smoke.py [--arch x86_64|ppc64le] [--kernel PATH] [--initrd PATH] [--qemu BIN]
                [--case NAME ...] [--workdir DIR] [--transcript FILE] [--verbose]
"""

import argparse
import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

CACHE = os.environ.get("CORESCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "corescale")
READY_MARKER = b"corescale-guest: ready"
# TCG's CPU models report vendor AuthenticAMD without TOPOEXT, and Linux then ignores SMT
# siblings (every thread looks like its own core). With an Intel vendor string the guest
# reads CPUID leaf 0xB and sees the real socket/core/thread layout.
DEFAULT_CPU = "qemu64,vendor=GenuineIntel"
# Per architecture: QEMU binary, the Debian package that ships it, default -cpu.
ARCHES = {
    "x86_64": {"qemu": "qemu-system-x86_64", "package": "qemu-system-x86", "cpu": DEFAULT_CPU},
    "ppc64le": {"qemu": "qemu-system-ppc64", "package": "qemu-system-ppc", "cpu": "POWER9"},
}
T0 = time.monotonic()


class SmokeError(Exception):
    """A check failed; the message says which one."""


def now():
    return time.monotonic()


def check(cond, what):
    if not cond:
        raise SmokeError(what)


class Transcript:
    def __init__(self, path, verbose):
        self.fh = open(path, "w", encoding="utf-8") if path else None
        self.verbose = verbose
        self.case = ""

    def log(self, channel, direction, msg):
        rec = {"t": round(now() - T0, 4), "case": self.case, "ch": channel, "dir": direction, "msg": msg}
        if self.fh:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        if self.verbose:
            print(f"    [{rec['t']:8.3f}] {channel} {direction} {json.dumps(msg)}", flush=True)

    def note(self, text):
        self.log("note", "-", text)


class Timings:
    def __init__(self):
        self.rows = []

    def add(self, case, phase, seconds):
        self.rows.append((case, phase, seconds))
        print(f"  {phase:<58} {seconds * 1000:9.1f} ms", flush=True)


def connect_unix(path, deadline):
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if now() > deadline:
                raise SmokeError(f"cannot connect to {path}")
            time.sleep(0.01)


class Qmp:
    """Synchronous QMP client. Events are kept in order with their host arrival time."""

    def __init__(self, path, transcript, timeout=10.0):
        self.tr = transcript
        self.sock = connect_unix(path, now() + timeout)
        self.buf = b""
        self.events = []  # (arrival monotonic time, event dict)
        self.greeting = self._read(timeout)
        self.tr.log("qmp", "<", self.greeting)
        check("QMP" in self.greeting, f"QMP greeting expected, got {self.greeting}")

    def _read(self, timeout):
        deadline = now() + timeout
        while b"\n" not in self.buf:
            left = deadline - now()
            if left <= 0:
                raise SmokeError("timed out waiting for QMP data")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise SmokeError("QMP socket closed by QEMU")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _pump(self, timeout):
        msg = self._read(timeout)
        self.tr.log("qmp", "<", msg)
        if "event" in msg:
            self.events.append((now(), msg))
            return None
        return msg

    def execute(self, cmd, args=None, timeout=10.0, allow_error=False):
        req = {"execute": cmd}
        if args is not None:
            req["arguments"] = args
        self.tr.log("qmp", ">", req)
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = now() + timeout
        while True:
            msg = self._pump(max(0.0, deadline - now()))
            if msg is None:
                continue
            if "error" in msg and not allow_error:
                raise SmokeError(f"QMP {cmd} failed: {json.dumps(msg)}")
            return msg

    def wait_event(self, pred, timeout, what, since=0.0):
        """Return the first (time, event) with arrival >= since that satisfies pred."""
        deadline = now() + timeout
        while True:
            for item in self.events:
                if item[0] >= since and pred(item[1]):
                    return item
            left = deadline - now()
            if left <= 0:
                raise SmokeError(f"timed out after {timeout}s waiting for {what}")
            try:
                self._pump(left)
            except SmokeError:
                if now() >= deadline:
                    raise SmokeError(f"timed out after {timeout}s waiting for {what}")
                raise

    def drain(self, seconds):
        """Read whatever arrives during `seconds` (events only)."""
        deadline = now() + seconds
        while now() < deadline:
            r, _, _ = select.select([self.sock], [], [], max(0.0, deadline - now()))
            if not r:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                msg = json.loads(line)
                self.tr.log("qmp", "<", msg)
                if "event" in msg:
                    self.events.append((now(), msg))


class Qga:
    """QEMU guest agent over an isa-serial chardev socket.

    The serial line has no framing and may hold garbage (a half-written request from an
    earlier client, output from before the agent started). Resync: send 0xFF (the agent's
    JSON lexer resets on it), then guest-sync-delimited with a fresh id; the agent answers
    0xFF followed by {"return": id}. Everything before the 0xFF and any object that is not
    our id is discarded.
    """

    def __init__(self, path, transcript):
        self.path = path
        self.tr = transcript
        self.sock = None
        self.buf = b""
        self.next_id = int(time.time()) % 100000 * 1000

    def connect(self, timeout=10.0):
        self.sock = connect_unix(self.path, now() + timeout)
        self.buf = b""

    def close(self):
        if self.sock:
            self.sock.close()
            self.sock = None

    def _send(self, obj, prefix=b""):
        self.tr.log("qga", ">", obj if not prefix else {"raw_prefix": prefix.hex(), "json": obj})
        self.sock.sendall(prefix + json.dumps(obj).encode() + b"\n")

    def _fill(self, deadline):
        left = deadline - now()
        if left <= 0:
            return False
        r, _, _ = select.select([self.sock], [], [], left)
        if not r:
            return False
        chunk = self.sock.recv(65536)
        if not chunk:
            raise SmokeError("QGA socket closed by QEMU")
        self.buf += chunk
        return True

    def _next_obj(self, deadline):
        dec = json.JSONDecoder()
        while True:
            text = self.buf.lstrip(b" \t\r\n\xff")
            if text:
                try:
                    obj, end = dec.raw_decode(text.decode("utf-8", errors="replace"))
                    consumed = len(text.decode("utf-8", errors="replace")[:end].encode("utf-8", errors="replace"))
                    self.buf = text[consumed:]
                    return obj
                except ValueError:
                    if b"\n" in text:
                        # Not JSON (garbage on the line): drop up to the newline.
                        self.buf = text.split(b"\n", 1)[1]
                        continue
            if not self._fill(deadline):
                return None

    def sync(self, timeout=30.0, attempt_timeout=1.0):
        """Resynchronise the line; returns the number of attempts it took."""
        deadline = now() + timeout
        attempts = 0
        while now() < deadline:
            attempts += 1
            self.next_id += 1
            sid = self.next_id
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": sid}}, prefix=b"\xff")
            until = min(deadline, now() + attempt_timeout)
            # Skip to the agent's 0xFF delimiter, then read objects until our id comes back.
            while now() < until:
                if b"\xff" in self.buf:
                    self.buf = self.buf[self.buf.rindex(b"\xff") + 1:]
                    break
                self._fill(until)
            while now() < until:
                obj = self._next_obj(until)
                if obj is None:
                    break
                self.tr.log("qga", "<", obj)
                if obj == {"return": sid}:
                    return attempts
        raise SmokeError(f"guest agent did not answer guest-sync-delimited within {timeout}s")

    def execute(self, cmd, args=None, timeout=10.0, allow_error=False, expect_reply=True):
        req = {"execute": cmd}
        if args is not None:
            req["arguments"] = args
        self._send(req)
        if not expect_reply:
            return None
        deadline = now() + timeout
        obj = self._next_obj(deadline)
        if obj is None:
            raise SmokeError(f"guest agent gave no reply to {cmd} within {timeout}s")
        self.tr.log("qga", "<", obj)
        if "error" in obj and not allow_error:
            raise SmokeError(f"QGA {cmd} failed: {json.dumps(obj)}")
        return obj

    def read_file(self, path, allow_error=False):
        """Read a whole guest file; returns bytes, or the error object when allow_error."""
        r = self.execute("guest-file-open", {"path": path, "mode": "r"}, allow_error=allow_error)
        if "error" in r:
            return r
        handle = r["return"]
        check(isinstance(handle, int), f"guest-file-open returned a non-integer handle: {r}")
        data = b""
        try:
            while True:
                rr = self.execute("guest-file-read", {"handle": handle, "count": 65536})["return"]
                data += base64.b64decode(rr["buf-b64"])
                if rr["eof"] or rr["count"] == 0:
                    break
        finally:
            self.execute("guest-file-close", {"handle": handle})
        return data

    def vcpus(self):
        r = self.execute("guest-get-vcpus")["return"]
        return {v["logical-id"]: v for v in r}


class Guest:
    def __init__(self, args, name, smp, extra, tr, accel="tcg,thread=multi"):
        self.args = args
        self.name = name
        self.tr = tr
        self.dir = os.path.join(args.workdir, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.qga_path = os.path.join(self.dir, "qga.sock")
        self.serial_path = os.path.join(self.dir, "serial.log")
        if args.arch == "ppc64le":
            self.cmd = ppc64le_command(args, smp, extra, accel, self.serial_path, self.qmp_path, self.qga_path)
            self.proc = None
            self.qmp = None
            self.qga = None
            return
        self.cmd = [
            args.qemu,
            "-machine", "q35",
            "-accel", accel,
            "-cpu", args.cpu,
            "-m", "256M",
            "-smp", smp,
            *extra,
            "-kernel", args.kernel,
            "-initrd", args.initrd,
            "-append", "console=ttyS0 panic=-1",
            "-display", "none",
            "-serial", f"file:{self.serial_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,path={self.qga_path},server=on,wait=off,id=qga0",
            "-device", "isa-serial,chardev=qga0",
            "-sandbox", args.sandbox,
            "-no-reboot",
        ]
        self.proc = None
        self.qmp = None
        self.qga = None

    def start(self, timings):
        print(f"  command: {' '.join(self.cmd)}", flush=True)
        self.tr.note({"command": self.cmd})
        t_start = now()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(self.dir, "qemu.out"), "wb"),
                                     stderr=subprocess.STDOUT)
        self.qmp = Qmp(self.qmp_path, self.tr)
        t_qmp = now()
        self.qmp.execute("qmp_capabilities")
        timings.add(self.name, "qemu start -> QMP greeting", t_qmp - t_start)
        deadline = now() + 120
        while True:
            if self.proc.poll() is not None:
                raise SmokeError(f"QEMU exited with {self.proc.returncode} during boot: {self.qemu_output()}")
            data = self.serial()
            if READY_MARKER in data:
                break
            check(now() < deadline, f"no '{READY_MARKER.decode()}' on the serial console within 120s; tail: {data[-2000:]!r}")
            time.sleep(0.01)
        t_ready = now()
        timings.add(self.name, "qemu start -> console 'corescale-guest: ready'", t_ready - t_start)
        self.qga = Qga(self.qga_path, self.tr)
        self.qga.connect()
        attempts = self.qga.sync()
        t_agent = now()
        timings.add(self.name, f"qemu start -> agent answers guest-sync-delimited ({attempts} tries)", t_agent - t_start)
        return t_agent - t_start

    def serial(self):
        try:
            with open(self.serial_path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return b""

    def qemu_output(self):
        try:
            with open(os.path.join(self.dir, "qemu.out"), "rb") as fh:
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(10) is None:
                self.proc.kill()
                self.proc.wait()
        if self.qga:
            self.qga.close()


def ppc64le_command(args, smp, extra, accel, serial_path, qmp_path, qga_path):
    """The pseries recipe: VOF instead of SLOF, the console on an spapr-vty, the agent on
    a virtio-serial port.

    -nodefaults drops the default VGA/USB/serial; the machine still creates its nvram at
    reg 0x71000000, so the console vty takes 0x71000001 (hvc0: the lowest vty is the
    firmware's stdout). A vty's IRQ follows the low bits of its reg, so a reg like
    0x30000000 collides with the nvram ("IRQ 4592 is not free"). The agent is not on a
    second vty: an hvc tty echoes what arrives before the agent sets it raw, and that echo
    drains slowly, interleaved with (and garbling) the agent's first replies.
    """
    return [
        args.qemu,
        "-machine", "pseries,x-vof=on",
        "-accel", accel,
        "-cpu", args.cpu,
        "-m", "512M",
        "-smp", smp,
        *extra,
        "-kernel", args.kernel,
        "-initrd", args.initrd,
        "-append", "console=hvc0 panic=-1",
        "-display", "none",
        "-nodefaults",
        "-chardev", f"file,id=con0,path={serial_path}",
        "-device", "spapr-vty,chardev=con0,reg=0x71000001",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-chardev", f"socket,path={qga_path},server=on,wait=off,id=qga0",
        "-device", "virtio-serial-pci,id=agent-serial",
        "-device", "virtserialport,bus=agent-serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
        "-sandbox", args.sandbox,
        "-no-reboot",
    ]


# ---- helpers over a running guest -----------------------------------------------------------

def hotpluggable(g):
    return g.qmp.execute("query-hotpluggable-cpus")["return"]


def cpus_fast(g):
    return g.qmp.execute("query-cpus-fast")["return"]


def slot_of(slots, **props):
    for s in slots:
        if all(s["props"].get(k) == v for k, v in props.items()):
            return s
    raise SmokeError(f"no hot-pluggable slot with props {props} in {slots}")


def is_ost(ev, device, source):
    return ev["event"] == "ACPI_DEVICE_OST" and ev["data"]["info"].get("device") == device \
        and ev["data"]["info"].get("source") == source


def is_final_eject(ev, slot):
    if ev["event"] != "ACPI_DEVICE_OST":
        return False
    info = ev["data"]["info"]
    return info.get("slot-type") == "CPU" and info.get("slot") == slot and info.get("source") == 3 \
        and info.get("status") != 0x84


def wait_vcpus(g, pred, timeout, what):
    deadline = now() + timeout
    while True:
        v = g.qga.vcpus()
        if pred(v):
            return v
        check(now() < deadline, f"timed out after {timeout}s waiting until {what}; agent says {v}")
        time.sleep(0.01)


def read_text(g, path):
    r = g.qga.read_file(path, allow_error=True)
    if isinstance(r, dict):
        return None, r
    return r.decode(errors="replace").strip(), None


def topology(g, n):
    """Topology of guest logical CPU n read through the agent (only complete when online)."""
    out = {}
    base = f"/sys/devices/system/cpu/cpu{n}"
    for f in ("topology/physical_package_id", "topology/core_id", "topology/thread_siblings_list",
              "topology/core_siblings_list", "topology/die_id"):
        text, err = read_text(g, f"{base}/{f}")
        out[f.split("/")[-1]] = text if err is None else {"error": err["error"]}
    # firmware_node is the ACPI0007 processor device: its _UID and AML path exist even offline.
    for f in ("firmware_node/uid", "firmware_node/path"):
        text, err = read_text(g, f"{base}/{f}")
        out[f.replace("/", ".")] = text if err is None else {"error": err["error"]}
    return out


def cpuinfo_apicids(g):
    text, err = read_text(g, "/proc/cpuinfo")
    check(err is None, f"/proc/cpuinfo unreadable through the agent: {err}")
    res = {}
    cur = None
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = (x.strip() for x in line.split(":", 1))
        if k == "processor":
            cur = int(v)
            res[cur] = {}
        elif cur is not None and k in ("physical id", "core id", "apicid", "initial apicid"):
            res[cur][k] = int(v)
    return res


def plug(g, tm, slot, dev_id, extra_props=None):
    """device_add the slot; wait for the insert OST and for the agent to see the new CPU offline.

    Returns the guest's logical id of the new CPU.
    """
    before = set(g.qga.vcpus())
    args = {"driver": slot["type"], "id": dev_id, **slot["props"], **(extra_props or {})}
    t0 = now()
    r = g.qmp.execute("device_add", args)
    t_add = now()
    check(r == {"return": {}}, f"device_add returned {r}")
    tm.add(g.name, f"device_add {dev_id} -> QMP return", t_add - t0)
    t_ev, ev = g.qmp.wait_event(lambda e: is_ost(e, dev_id, 1), 20, f"insert ACPI_DEVICE_OST for {dev_id}", since=t0)
    info = ev["data"]["info"]
    check(info["status"] == 0 and info["slot-type"] == "CPU", f"insert OST not successful: {ev}")
    tm.add(g.name, f"device_add {dev_id} -> ACPI_DEVICE_OST insert (source 1)", t_ev - t0)
    v = wait_vcpus(g, lambda v: len(set(v) - before) == 1, 20, f"the agent lists the new CPU for {dev_id}")
    t_seen = now()
    new = (set(v) - before).pop()
    tm.add(g.name, f"device_add {dev_id} -> agent lists cpu{new}", t_seen - t0)
    check(v[new]["online"] is False, f"hot-added cpu{new} arrived online (the guest must not online it itself): {v[new]}")
    return new


def online(g, tm, n, state=True):
    t0 = now()
    r = g.qga.execute("guest-set-vcpus", {"vcpus": [{"logical-id": n, "online": state}]}, timeout=30)
    check(r == {"return": 1}, f"guest-set-vcpus returned {r}")
    t1 = now()
    v = g.qga.vcpus()
    check(v[n]["online"] is state, f"cpu{n} online={v[n]['online']} after guest-set-vcpus online={state}")
    tm.add(g.name, f"guest-set-vcpus cpu{n} online={str(state).lower()} -> return", t1 - t0)
    return v


def wait_eject(g, tm, dev_id, t0, label):
    """Wait for the two OSTs of an eject: 'in progress' (0x84, names the device) then the final one.

    The final OST arrives after QEMU unrealized the CPU: it has no "device" field, only the slot.
    """
    t_ev, ev = g.qmp.wait_event(lambda e: is_ost(e, dev_id, 3), 30, f"eject-request ACPI_DEVICE_OST for {dev_id}", since=t0)
    info = ev["data"]["info"]
    check(info["status"] == 0x84, f"first eject OST should be status 0x84 (eject in progress): {ev}")
    tm.add(g.name, f"{label} -> OST source 3 status 0x84 (device {dev_id})", t_ev - t0)
    slot = info["slot"]
    t_ev, ev = g.qmp.wait_event(lambda e: is_final_eject(e, slot), 30,
                                f"final eject ACPI_DEVICE_OST for slot {slot} ({dev_id})", since=t0)
    info = ev["data"]["info"]
    check(info["status"] == 0 and "device" not in info, f"final eject OST should be status 0 without device: {ev}")
    tm.add(g.name, f"{label} -> OST source 3 status 0 (slot {slot}, no device)", t_ev - t0)
    return t_ev


def unplug(g, tm, dev_id, n, note=""):
    t0 = now()
    r = g.qmp.execute("device_del", {"id": dev_id})
    check(r == {"return": {}}, f"device_del returned {r}")
    label = f"device_del {dev_id}{note}"
    wait_eject(g, tm, dev_id, t0, label)
    wait_vcpus(g, lambda v: n not in v, 20, f"cpu{n} is gone from guest-get-vcpus")
    tm.add(g.name, f"{label} -> cpu{n} gone from the agent", now() - t0)
    deadline = now() + 10
    while any(c["qom-path"].endswith("/" + dev_id) for c in cpus_fast(g)):
        check(now() < deadline, f"{dev_id} still in query-cpus-fast 10s after its eject")
        time.sleep(0.01)
    tm.add(g.name, f"{label} -> gone from query-cpus-fast", now() - t0)
    g.qmp.drain(0.2)
    other = [e for t, e in g.qmp.events if t >= t0 and e["event"] != "ACPI_DEVICE_OST"]
    g.tr.note({"non_ost_events_after_device_del": other})
    print(f"  other events after device_del {dev_id}: {json.dumps(other)}", flush=True)
    return other


def expect_qmp_error(g, cmd, args, what):
    r = g.qmp.execute(cmd, args, allow_error=True)
    check("error" in r, f"{what}: expected a QMP error, got {r}")
    check(set(r["error"]) >= {"class", "desc"}, f"{what}: error lacks class/desc: {r}")
    print(f"  {what}: {json.dumps(r)}", flush=True)
    return r


def qga_protocol_probes(g, tr):
    """Record the agent's answers to the calls and mistakes a backend will make."""
    q = g.qga
    check(q.execute("guest-ping") == {"return": {}}, "guest-ping")
    q.next_id += 1
    r = q.execute("guest-sync", {"id": q.next_id})
    check(r == {"return": q.next_id}, f"guest-sync echoes its id: {r}")
    r = q.execute("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": False}]}, allow_error=True)
    print(f"  guest-set-vcpus offline cpu0: {json.dumps(r)}", flush=True)
    check("error" in r, f"offlining cpu0 must fail: {r}")
    r = q.execute("guest-set-vcpus", {"vcpus": [{"logical-id": 7, "online": True}]}, allow_error=True)
    print(f"  guest-set-vcpus of an absent cpu7: {json.dumps(r)}", flush=True)
    check("error" in r, f"onlining an absent CPU must fail: {r}")
    r = q.execute("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": True}]})
    check(r == {"return": 1}, f"onlining an online CPU is a no-op that counts 1: {r}")
    r = q.execute("guest-set-vcpus", {"vcpus": [{"logical-id": 0, "online": True}, {"logical-id": 7, "online": True}]},
                  allow_error=True)
    print(f"  guest-set-vcpus [cpu0 ok, cpu7 absent]: {json.dumps(r)}", flush=True)
    check(r == {"return": 1}, f"a batch stops at the first failure and returns how many it did: {r}")
    # A request's "id" comes back in its reply: a way to pair replies with requests.
    q._send({"execute": "guest-ping", "id": "corr-1"})
    r = q._next_obj(now() + 5)
    tr.log("qga", "<", r)
    check(r == {"return": {}, "id": "corr-1"}, f"the agent echoes a request's id: {r}")
    r = q.execute("guest-no-such-command", allow_error=True)
    check(r.get("error", {}).get("class") == "CommandNotFound", f"unknown command: {r}")
    # Garbage on the line: the agent answers with an error object (or nothing) and keeps going.
    q._send({"garbage": "not a command"})
    r = q._next_obj(now() + 3)
    tr.log("qga", "<", r)
    print(f"  agent's answer to a JSON object without 'execute': {json.dumps(r)}", flush=True)
    # A client that dies mid-request leaves a half-written object in the agent's lexer.
    q.sock.sendall(b'{"execute": "guest-get-vcpus", "argu')
    tr.log("qga", ">", {"raw": '{"execute": "guest-get-vcpus", "argu', "then": "disconnect"})
    q.close()
    q.connect()
    t0 = now()
    attempts = q.sync()
    tr.note({"resync_after_half_request": {"attempts": attempts, "seconds": round(now() - t0, 4)}})
    print(f"  resync after a half-written request: {attempts} guest-sync-delimited tries, "
          f"{(now() - t0) * 1000:.1f} ms", flush=True)
    v = q.vcpus()
    check(list(v) == [0], f"agent usable after resync: {v}")


# ---- cases ----------------------------------------------------------------------------------

def case_sockets1(args, tr, tm):
    """1 socket x 4 cores: plug/online/unplug twice (online vs offlined first), stop/cont, errors."""
    g = Guest(args, "sockets1", "1,maxcpus=4,sockets=1,cores=4,threads=1", [], tr)
    try:
        tm.boot.append(g.start(tm))
        info = g.qga.execute("guest-info")["return"]
        tr.note({"qga_version": info["version"]})
        slots = hotpluggable(g)
        check(len(slots) == 4, f"query-hotpluggable-cpus: expected 4 slots, got {len(slots)}")
        present = [s for s in slots if "qom-path" in s]
        check(len(present) == 1 and present[0]["props"] == {"socket-id": 0, "core-id": 0, "thread-id": 0},
              f"exactly the boot CPU (0/0/0) should be present: {present}")
        check(all(s["vcpus-count"] == 1 for s in slots), f"vcpus-count must be 1: {slots}")
        fast = cpus_fast(g)
        check(len(fast) == 1 and isinstance(fast[0]["thread-id"], int), f"query-cpus-fast: {fast}")
        check(fast[0]["qom-path"] == present[0]["qom-path"], "query-cpus-fast qom-path != hotpluggable qom-path")
        v = g.qga.vcpus()
        check(list(v) == [0] and v[0]["online"] and v[0]["can-offline"] is False, f"guest-get-vcpus at boot: {v}")

        qga_protocol_probes(g, tr)

        # Errors that must not consume one of the maxcpus vCPU threads.
        boot = present[0]
        expect_qmp_error(g, "device_add", {"driver": boot["type"], "id": "dup", **boot["props"]},
                         "device_add of an occupied slot")
        expect_qmp_error(g, "device_add", {"driver": boot["type"], "id": "bad", "socket-id": 0, "core-id": 9, "thread-id": 0},
                         "device_add with core-id out of range")
        expect_qmp_error(g, "device_del", {"id": boot["qom-path"]}, "device_del of the boot CPU")
        expect_qmp_error(g, "device_del", {"id": "no-such-cpu"}, "device_del of an unknown id")

        # A: plug core 1, online through the agent, read topology, unplug while ONLINE.
        s1 = slot_of(slots, **{"core-id": 1})
        n = plug(g, tm, s1, "cpu-s0-c1-t0")
        tr.note({"offline_cpu_files": topology(g, n)})
        expect_qmp_error(g, "device_add", {"driver": s1["type"], "id": "cpu-s0-c1-t0", **s1["props"]},
                         "device_add of a slot plugged a moment ago (same id)")
        expect_qmp_error(g, "device_add", {"driver": s1["type"], "id": "cpu-other", **s1["props"]},
                         "device_add of a plugged slot (new id)")
        online(g, tm, n)
        topo = topology(g, n)
        tr.note({"online_cpu_files": topo})
        print(f"  cpu{n} topology via agent: {json.dumps(topo)}", flush=True)
        check(topo["physical_package_id"] == "0" and topo["core_id"] == "1",
              f"cpu{n} topology should be package 0 core 1: {topo}")
        check(topo["thread_siblings_list"] == str(n), f"cpu{n} has no SMT siblings: {topo}")
        apic = cpuinfo_apicids(g)
        tr.note({"cpuinfo": apic})
        check(apic[n]["apicid"] == 1, f"cpu{n} apicid should be 1: {apic}")
        slots = hotpluggable(g)
        check(slot_of(slots, **{"core-id": 1}).get("qom-path") == "/machine/peripheral/cpu-s0-c1-t0",
              f"plugged slot's qom-path: {slots}")
        fast = cpus_fast(g)
        check(len(fast) == 2 and len({c["thread-id"] for c in fast}) == 2, f"query-cpus-fast after plug: {fast}")
        unplug(g, tm, "cpu-s0-c1-t0", n, " (guest CPU online)")

        # B: plug core 2, online, offline through the agent, then unplug.
        n = plug(g, tm, slot_of(slots, **{"core-id": 2}), "cpu-s0-c2-t0")
        online(g, tm, n, True)
        online(g, tm, n, False)
        unplug(g, tm, "cpu-s0-c2-t0", n, " (guest CPU offlined first)")

        # C: plug core 3, online; stop the VM; device_del; the eject needs the guest to run.
        n = plug(g, tm, slot_of(slots, **{"core-id": 3}), "cpu-s0-c3-t0")
        online(g, tm, n)
        g.qmp.execute("stop")
        t0 = now()
        r = g.qmp.execute("device_del", {"id": "cpu-s0-c3-t0"})
        check(r == {"return": {}}, f"device_del while stopped returned {r}")
        g.qmp.drain(2.0)
        stopped_ost = [e for t, e in g.qmp.events if t >= t0 and e["event"] == "ACPI_DEVICE_OST"]
        tr.note({"ost_while_stopped": stopped_ost})
        check(not stopped_ost, f"no OST can come while the guest is stopped: {stopped_ost}")
        still = any(c["qom-path"].endswith("/cpu-s0-c3-t0") for c in cpus_fast(g))
        check(still, "the vCPU must still exist while the guest is stopped")
        t_cont = now()
        g.qmp.execute("cont")
        wait_eject(g, tm, "cpu-s0-c3-t0", t_cont, "cont after device_del while stopped")
        wait_vcpus(g, lambda v: n not in v, 20, f"cpu{n} gone after cont")

        # Clean poweroff through the agent: no reply, QMP SHUTDOWN, QEMU exits 0.
        t0 = now()
        g.qga.execute("guest-shutdown", {"mode": "powerdown"}, expect_reply=False)
        t_ev, ev = g.qmp.wait_event(lambda e: e["event"] == "SHUTDOWN", 30, "SHUTDOWN after guest-shutdown", since=t0)
        tr.note({"shutdown_event": ev})
        check(ev["data"] == {"guest": True, "reason": "guest-shutdown"}, f"SHUTDOWN event data: {ev}")
        rc = g.wait_exit(30)
        check(rc == 0, f"QEMU exit code after guest-shutdown: {rc}")
        tm.add(g.name, "guest-shutdown -> QEMU exited 0", now() - t0)
    finally:
        g.kill()


def case_numa2(args, tr, tm):
    """2 sockets, one NUMA node each (memdev); plug a CPU into socket 1 / node 1."""
    extra = [
        "-object", "memory-backend-ram,id=mem0,size=128M",
        "-object", "memory-backend-ram,id=mem1,size=128M",
        "-numa", "node,nodeid=0,memdev=mem0",
        "-numa", "node,nodeid=1,memdev=mem1",
        "-numa", "cpu,node-id=0,socket-id=0",
        "-numa", "cpu,node-id=1,socket-id=1",
    ]
    g = Guest(args, "numa2", "1,maxcpus=4,sockets=2,cores=2,threads=1", extra, tr)
    try:
        tm.boot.append(g.start(tm))
        slots = hotpluggable(g)
        check(len(slots) == 4, f"expected 4 slots: {slots}")
        for s in slots:
            check(s["props"].get("node-id") == s["props"]["socket-id"], f"node-id must follow socket-id: {s}")
        fast = cpus_fast(g)
        check(fast[0]["props"].get("node-id") == 0, f"query-cpus-fast props carry node-id: {fast}")
        s = slot_of(slots, **{"socket-id": 1, "core-id": 0})
        wrong = dict(s["props"], **{"node-id": 0})
        expect_qmp_error(g, "device_add", {"driver": s["type"], "id": "cpu-wrong-node", **wrong},
                         "device_add with a node-id that contradicts -numa cpu")
        n = plug(g, tm, s, "cpu-s1-c0-t0")
        online(g, tm, n)
        topo = topology(g, n)
        print(f"  cpu{n} topology via agent: {json.dumps(topo)}", flush=True)
        check(topo["physical_package_id"] == "1" and topo["core_id"] == "0", f"cpu{n} should be package 1 core 0: {topo}")
        node1, err = read_text(g, "/sys/devices/system/node/node1/cpulist")
        tr.note({"node1_cpulist": node1, "error": err})
        check(node1 == str(n), f"node1's cpulist should be {n}: {node1} {err}")
        apic = cpuinfo_apicids(g)
        check(apic[n]["apicid"] == 2, f"socket 1 core 0 has APIC id 2 (2 cores per socket): {apic}")
        unplug(g, tm, "cpu-s1-c0-t0", n, " (numa node 1)")
        # ACPI power button -> acpid -> poweroff.
        t0 = now()
        g.qmp.execute("system_powerdown")
        t_ev, ev = g.qmp.wait_event(lambda e: e["event"] == "SHUTDOWN" and e["data"].get("guest"), 30,
                                    "guest SHUTDOWN after system_powerdown", since=t0)
        tr.note({"shutdown_event": ev})
        rc = g.wait_exit(30)
        check(rc == 0, f"QEMU exit code after system_powerdown: {rc}")
        tm.add(g.name, "system_powerdown -> QEMU exited", now() - t0)
    finally:
        g.kill()


def case_smt2(args, tr, tm):
    """1 socket x 2 cores x 2 threads: plug the boot core's second thread."""
    g = Guest(args, "smt2", "1,maxcpus=4,sockets=1,cores=2,threads=2", [], tr)
    try:
        tm.boot.append(g.start(tm))
        slots = hotpluggable(g)
        check(len(slots) == 4 and all(s["vcpus-count"] == 1 for s in slots), f"4 single-thread slots: {slots}")
        n = plug(g, tm, slot_of(slots, **{"core-id": 0, "thread-id": 1}), "cpu-s0-c0-t1")
        online(g, tm, n)
        topo = topology(g, n)
        print(f"  cpu{n} topology via agent: {json.dumps(topo)}", flush=True)
        siblings = "0-1" if n == 1 else f"0,{n}"
        check(topo["core_id"] == "0" and topo["thread_siblings_list"] == siblings,
              f"cpu{n} should be core 0's SMT sibling of cpu0 (siblings {siblings}): {topo}")
        apic = cpuinfo_apicids(g)
        check(apic[n]["apicid"] == 1, f"core 0 thread 1 has APIC id 1: {apic}")
        n2 = plug(g, tm, slot_of(slots, **{"core-id": 1, "thread-id": 0}), "cpu-s0-c1-t0")
        online(g, tm, n2)
        topo2 = topology(g, n2)
        check(topo2["core_id"] == "1", f"cpu{n2} should be core 1: {topo2}")
        apic = cpuinfo_apicids(g)
        check(apic[n2]["apicid"] == 2, f"core 1 thread 0 has APIC id 2: {apic}")
        unplug(g, tm, "cpu-s0-c0-t1", n, " (SMT sibling)")
        unplug(g, tm, "cpu-s0-c1-t0", n2, " (core 1)")
        t0 = now()
        g.qmp.execute("quit")
        rc = g.wait_exit(30)
        check(rc == 0, f"QEMU exit code after quit: {rc}")
        tm.add(g.name, "quit -> QEMU exited", now() - t0)
    finally:
        g.kill()


def qemu_died(g, timeout=5.0):
    rc = g.wait_exit(timeout)
    return rc, g.qemu_output().strip()


def case_budget(args, tr, tm):
    """What one QEMU process survives: re-plugging a slot, and TCG's threading modes.

    multi-threaded TCG (the recipe): QEMU sizes its TCG contexts for maxcpus vCPU threads
    for its whole life and does not reuse an unplugged vCPU's thread, so the (maxcpus+1)-th
    vCPU creation aborts QEMU ("tcg_register_thread: assertion failed: (n < tcg_max_ctxs)").
    single-threaded TCG is no way out: there unplugging a vCPU aborts QEMU
    ("qemu_thread_join: Resource deadlock avoided"). Both are recorded with maxcpus=2.
    """
    # multi: boot 1 + plug 1 = maxcpus threads; unplug; the next plug is one too many.
    g = Guest(args, "budget-multi", "1,maxcpus=2,sockets=1,cores=2,threads=1", [], tr)
    try:
        tm.boot.append(g.start(tm))
        s1 = slot_of(hotpluggable(g), **{"core-id": 1})
        n = plug(g, tm, s1, "cpu-a")
        online(g, tm, n)
        unplug(g, tm, "cpu-a", n)
        try:
            r = g.qmp.execute("device_add", {"driver": s1["type"], "id": "cpu-b", **s1["props"]},
                              allow_error=True, timeout=20)
        except (SmokeError, OSError) as e:
            r = {"no_reply": str(e)}
        rc, out = qemu_died(g)
        tr.note({"replug_multi": {"reply": r, "qemu_exit": rc, "qemu_output": out}})
        print(f"  thread=multi, 3rd vCPU creation with maxcpus=2: reply {json.dumps(r)}, exit {rc}, output {out!r}",
              flush=True)
        if rc is None:
            check(r == {"return": {}}, f"QEMU neither plugged nor died on the 3rd vCPU creation: {r}")
            print("  note: this QEMU re-plugs past maxcpus under multi-threaded TCG: the budget is gone", flush=True)
        else:
            check("tcg_max_ctxs" in out, f"QEMU died for another reason: {out}")
            print("  confirmed: multi-threaded TCG aborts on the (maxcpus+1)-th vCPU creation", flush=True)
    finally:
        g.kill()

    # single: plug and online work; record what device_del does.
    g = Guest(args, "budget-single", "1,maxcpus=2,sockets=1,cores=2,threads=1", [], tr, accel="tcg,thread=single")
    try:
        tm.boot.append(g.start(tm))
        s1 = slot_of(hotpluggable(g), **{"core-id": 1})
        n = plug(g, tm, s1, "cpu-a")
        online(g, tm, n)
        try:
            r = g.qmp.execute("device_del", {"id": "cpu-a"})
            g.qmp.wait_event(lambda e: is_final_eject(e, "1"), 20, "final eject OST under thread=single")
        except (SmokeError, OSError) as e:
            r = {"no_reply_or_event": str(e)}
        rc, out = qemu_died(g, 2.0)
        tr.note({"unplug_single": {"reply": r, "qemu_exit": rc, "qemu_output": out}})
        print(f"  thread=single, device_del of a hot-added vCPU: {json.dumps(r)}, exit {rc}, output {out!r}", flush=True)
        if rc is not None:
            check("qemu_thread_join" in out, f"QEMU died for another reason: {out}")
            print("  confirmed: single-threaded TCG aborts when a vCPU is unplugged: do not use thread=single",
                  flush=True)
        else:
            print("  note: this QEMU unplugs under single-threaded TCG", flush=True)
    finally:
        g.kill()


CASES = {"sockets1": case_sockets1, "numa2": case_numa2, "smt2": case_smt2, "budget": case_budget}


# ---- ppc64le (pseries) ----------------------------------------------------------------------
#
# On pseries a hot-pluggable slot is a whole core (vcpus-count = threads). device_add gets
# no event back: the guest kernel receives an RTAS hot-plug event, adds the core through
# DLPAR and onlines every thread by itself. device_del ends with DEVICE_DELETED events: per
# thread its interrupt presenters and the thread, then the core (the only one with "device").

SYSCPU = "/sys/devices/system/cpu"


def cpulist(text):
    """Parse a kernel cpu list ("0-1,4-5") into a set of ints."""
    out = set()
    for part in (text or "").split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return out


def guest_cpus(g):
    """(online, present) sets of guest logical CPUs, read through the agent."""
    on, err = read_text(g, f"{SYSCPU}/online")
    check(err is None, f"{SYSCPU}/online unreadable: {err}")
    pr, err = read_text(g, f"{SYSCPU}/present")
    check(err is None, f"{SYSCPU}/present unreadable: {err}")
    return cpulist(on), cpulist(pr)


def ppc_cpu_files(g, n):
    """What the guest says about logical CPU n: hard id, core, siblings."""
    out = {}
    for f in ("physical_id", "topology/core_id", "topology/thread_siblings_list",
              "topology/core_siblings_list", "topology/physical_package_id"):
        text, err = read_text(g, f"{SYSCPU}/cpu{n}/{f}")
        out[f.split("/")[-1]] = text if err is None else {"error": err["error"]["desc"]}
    return out


def ppc_check_map(g, core_id, threads, logical):
    """Prove the mapping rule on these logical CPUs of one core; returns {logical: files}."""
    files = {n: ppc_cpu_files(g, n) for n in sorted(logical)}
    g.tr.note({"cpu_files": files, "core_id": core_id})
    print(f"  core-id {core_id}: guest files {json.dumps(files)}", flush=True)
    hard = set()
    for n, f in files.items():
        check(f["core_id"] == str(core_id), f"cpu{n}: topology/core_id {f['core_id']} != QEMU core-id {core_id}")
        pid = int(f["physical_id"])
        check(core_id <= pid < core_id + threads, f"cpu{n}: physical_id {pid} outside core {core_id}'s threads")
        hard.add(pid)
        check(cpulist(f["thread_siblings_list"]) == set(logical),
              f"cpu{n}: thread_siblings_list {f['thread_siblings_list']} != {sorted(logical)}")
    check(hard == set(range(core_id, core_id + threads)), f"physical_ids {hard} != core {core_id}'s threads")
    fast = [c for c in cpus_fast(g) if c["props"]["core-id"] == core_id]
    check(sorted(c["cpu-index"] for c in fast) == sorted(hard),
          f"query-cpus-fast cpu-index of core {core_id} {fast} != guest physical_ids {sorted(hard)}")
    return files


def ppc_plug(g, tm, slot, dev_id):
    """device_add a core; wait until the guest has onlined all its threads. Returns their logical ids."""
    threads = slot["vcpus-count"]
    before, _ = guest_cpus(g)
    args = {"driver": slot["type"], "id": dev_id, **slot["props"]}
    t0 = now()
    r = g.qmp.execute("device_add", args)
    t_add = now()
    check(r == {"return": {}}, f"device_add returned {r}")
    tm.add(g.name, f"device_add {dev_id} -> QMP return", t_add - t0)
    first = None
    deadline = now() + 30
    while True:
        on, pr = guest_cpus(g)
        new = on - before
        if new and first is None:
            first = now()
            tm.add(g.name, f"device_add {dev_id} -> first thread online in the guest", first - t0)
        if len(new) == threads:
            break
        check(now() < deadline, f"{dev_id}: guest onlined {sorted(new)} of {threads} threads within 30s")
        time.sleep(0.005)
    tm.add(g.name, f"device_add {dev_id} -> all {threads} threads online (cpus {sorted(new)})", now() - t0)
    check(new <= pr, f"online CPUs {sorted(new)} not in present {sorted(pr)}")
    v = g.qga.vcpus()
    check(all(v[n]["online"] for n in new), f"guest-get-vcpus disagrees with {SYSCPU}/online: {v}")
    g.qmp.drain(0.3)
    evs = [e for t, e in g.qmp.events if t >= t0]
    g.tr.note({"events_after_device_add": evs})
    check(not evs, f"no QMP event expected after a pseries core device_add: {evs}")
    return new


def ppc_unplug(g, tm, dev_id, logical, threads, note="", since=None, t_ref=None):
    """device_del a core (unless `since` says it was already sent); check the DEVICE_DELETED sequence."""
    if since is None:
        since = now()
        r = g.qmp.execute("device_del", {"id": dev_id})
        check(r == {"return": {}}, f"device_del returned {r}")
    t_ref = t_ref or since
    label = f"device_del {dev_id}{note}"
    t_ev, _ = g.qmp.wait_event(lambda e: e["event"] == "DEVICE_DELETED" and e["data"].get("device") == dev_id,
                               30, f"DEVICE_DELETED of core {dev_id}", since=since)
    tm.add(g.name, f"{label} -> DEVICE_DELETED of the core", t_ev - t_ref)
    g.qmp.drain(0.2)
    evs = [e for t, e in g.qmp.events if t >= since and e["event"] not in ("STOP", "RESUME")]
    g.tr.note({"events_after_device_del": evs})
    paths = [e["data"]["path"] for e in evs if e["event"] == "DEVICE_DELETED"]
    core_path = f"/machine/peripheral/{dev_id}"
    want = []
    for t in range(threads):
        want += [f"{core_path}/thread[{t}]/icp", f"{core_path}/thread[{t}]/xive-tctx", f"{core_path}/thread[{t}]"]
    want.append(core_path)
    check(paths == want, f"DEVICE_DELETED paths {paths} != expected {want}")
    check(all("device" not in e["data"] for e in evs[:-1]) and evs[-1]["data"].get("device") == dev_id,
          f"only the last DEVICE_DELETED (the core) names the device: {evs}")
    check(not any(c["qom-path"].startswith(core_path + "/") for c in cpus_fast(g)),
          f"{dev_id}'s threads still in query-cpus-fast after its DEVICE_DELETED")
    deadline = now() + 10
    while True:
        on, pr = guest_cpus(g)
        if not (set(logical) & (on | pr)):
            break
        check(now() < deadline, f"cpus {sorted(logical)} still online/present in the guest 10s after DEVICE_DELETED")
        time.sleep(0.005)
    tm.add(g.name, f"{label} -> cpus {sorted(logical)} neither online nor present", now() - t_ref)
    return evs


def ppc_boot_checks(g, threads, cores):
    slots = hotpluggable(g)
    g.tr.note({"query-hotpluggable-cpus": slots})
    print(f"  query-hotpluggable-cpus: {json.dumps(slots)}", flush=True)
    check(len(slots) == cores, f"expected {cores} core slots: {slots}")
    check(all(s["vcpus-count"] == threads and s["type"].endswith("-spapr-cpu-core") for s in slots),
          f"every slot is a {threads}-thread spapr core: {slots}")
    check(sorted(s["props"]["core-id"] for s in slots) == list(range(0, cores * threads, threads)),
          f"core-ids step by threads: {slots}")
    check(all(set(s["props"]) == {"core-id", "node-id"} for s in slots), f"props are core-id and node-id: {slots}")
    present = [s for s in slots if "qom-path" in s]
    check(len(present) == 1 and present[0]["props"]["core-id"] == 0, f"only the boot core is plugged: {present}")
    fast = cpus_fast(g)
    g.tr.note({"query-cpus-fast": fast})
    print(f"  query-cpus-fast: {json.dumps(fast)}", flush=True)
    check([c["cpu-index"] for c in fast] == list(range(threads)), f"boot threads' cpu-index: {fast}")
    check([c["qom-path"] for c in fast] == [f"{present[0]['qom-path']}/thread[{t}]" for t in range(threads)],
          f"thread qom-paths are <core>/thread[N]: {fast}")
    check(g.qga.execute("guest-ping") == {"return": {}}, "guest-ping")
    v = g.qga.vcpus()
    g.tr.note({"guest-get-vcpus": v})
    check(set(v) == set(range(cores * threads)), f"guest-get-vcpus lists every possible CPU on POWER: {v}")
    on, pr = guest_cpus(g)
    check(on == pr == set(range(threads)), f"boot: online {on} present {pr}")
    check({n for n in v if v[n]["online"]} == on, f"guest-get-vcpus online flags != {SYSCPU}/online: {v}")
    ppc_check_map(g, 0, threads, on)
    return slots, present[0]


def case_ppc_threads1(args, tr, tm):
    """pseries, 4 single-thread cores: plug a core that is not the next free one, map it,
    unplug it online, unplug while stopped (+ a repeated device_del), re-plug a removed
    core-id, errors, system_powerdown (EPOW)."""
    g = Guest(args, "ppc-threads1", "1,maxcpus=4,cores=4,threads=1", [], tr)
    try:
        tm.boot.append(g.start(tm))
        tr.note({"qga_version": g.qga.execute("guest-info")["return"]["version"]})
        slots, boot = ppc_boot_checks(g, 1, 4)
        expect_qmp_error(g, "device_add", {"driver": boot["type"], "id": "dup", "core-id": 0}, "device_add of the boot core")
        expect_qmp_error(g, "device_add", {"driver": boot["type"], "id": "bad", "core-id": 9}, "device_add with core-id 9")
        expect_qmp_error(g, "device_add", {"driver": boot["type"], "id": "bad", "core-id": 1, "node-id": 1},
                         "device_add with node-id 1")
        expect_qmp_error(g, "device_del", {"id": boot["qom-path"]}, "device_del of the boot core")
        expect_qmp_error(g, "device_del", {"id": "no-such-core"}, "device_del of an unknown id")

        new = ppc_plug(g, tm, slot_of(slots, **{"core-id": 2}), "core2")
        check(new == {1}, f"core 2 should become logical cpu1 (next free number): {new}")
        ppc_check_map(g, 2, 1, new)
        expect_qmp_error(g, "device_add", {"driver": boot["type"], "id": "core2x", "core-id": 2},
                         "device_add of a plugged core (new id)")
        check(slot_of(hotpluggable(g), **{"core-id": 2}).get("qom-path") == "/machine/peripheral/core2",
              "plugged slot's qom-path")
        ppc_unplug(g, tm, "core2", new, 1, " (threads online)")

        # Paused guest: device_del is accepted, nothing happens until cont.
        new3 = ppc_plug(g, tm, slot_of(slots, **{"core-id": 3}), "core3")
        g.qmp.execute("stop")
        t0 = now()
        r = g.qmp.execute("device_del", {"id": "core3"})
        check(r == {"return": {}}, f"device_del while stopped: {r}")
        r2 = g.qmp.execute("device_del", {"id": "core3"}, allow_error=True)
        tr.note({"second_device_del_while_pending": r2})
        print(f"  second device_del of core3 while its unplug is pending: {json.dumps(r2)}", flush=True)
        g.qmp.drain(2.0)
        stopped = [e for t, e in g.qmp.events if t >= t0 and e["event"] != "STOP"]
        check(not stopped, f"no event may come while the guest is stopped: {stopped}")
        check(any(c["props"]["core-id"] == 3 for c in cpus_fast(g)), "core3's thread must remain while stopped")
        t_cont = now()
        g.qmp.execute("cont")
        ppc_unplug(g, tm, "core3", new3, 1, " (sent while stopped; timed from cont)", since=t0, t_ref=t_cont)

        # Re-plug a removed core-id under a new device id (4th of maxcpus=4 vCPU threads).
        new2 = ppc_plug(g, tm, slot_of(slots, **{"core-id": 2}), "core2b")
        tr.note({"replug_logical": sorted(new2)})
        print(f"  re-plugged core 2 became logical cpus {sorted(new2)}", flush=True)
        ppc_check_map(g, 2, 1, new2)

        t0 = now()
        g.qmp.execute("system_powerdown")
        t_ev, ev = g.qmp.wait_event(lambda e: e["event"] == "SHUTDOWN", 30, "SHUTDOWN after system_powerdown", since=t0)
        tr.note({"shutdown_event": ev})
        check(ev["data"] == {"guest": True, "reason": "guest-shutdown"}, f"SHUTDOWN after system_powerdown: {ev}")
        tm.add(g.name, "system_powerdown -> SHUTDOWN (guest)", t_ev - t0)
        rc = g.wait_exit(30)
        check(rc == 0, f"QEMU exit code after system_powerdown: {rc}")
        check(b"corescale-guest: poweroff requested (EPOW)" in g.serial(), "the guest's /sbin/poweroff did not run")
    finally:
        g.kill()


def case_ppc_threads2(args, tr, tm):
    """pseries, 4 cores x 2 threads (boot: 1 core): plug core 4 then core 2, map their threads,
    unplug core 4, re-plug it, guest-shutdown through the agent."""
    g = Guest(args, "ppc-threads2", "2,maxcpus=8,cores=4,threads=2", [], tr)
    try:
        tm.boot.append(g.start(tm))
        slots, boot = ppc_boot_checks(g, 2, 4)
        expect_qmp_error(g, "device_add", {"driver": boot["type"], "id": "odd", "core-id": 3},
                         "device_add with a core-id that is not a multiple of threads")
        expect_qmp_error(g, "device_add", {"driver": boot["type"], "id": "big", "core-id": 8},
                         "device_add with core-id 8 (maxcpus 8)")
        n4 = ppc_plug(g, tm, slot_of(slots, **{"core-id": 4}), "core4")
        check(n4 == {2, 3}, f"core 4 should become logical cpus 2-3: {n4}")
        ppc_check_map(g, 4, 2, n4)
        n2 = ppc_plug(g, tm, slot_of(slots, **{"core-id": 2}), "core2")
        check(n2 == {4, 5}, f"core 2 should become logical cpus 4-5: {n2}")
        ppc_check_map(g, 2, 2, n2)
        tr.note({"query-hotpluggable-cpus-after-plugs": hotpluggable(g), "query-cpus-fast-after-plugs": cpus_fast(g)})
        ppc_unplug(g, tm, "core4", n4, 2)
        n4b = ppc_plug(g, tm, slot_of(slots, **{"core-id": 4}), "core4b")
        print(f"  re-plugged core 4 became logical cpus {sorted(n4b)}", flush=True)
        ppc_check_map(g, 4, 2, n4b)
        t0 = now()
        g.qga.execute("guest-shutdown", {"mode": "powerdown"}, expect_reply=False)
        t_ev, ev = g.qmp.wait_event(lambda e: e["event"] == "SHUTDOWN", 30, "SHUTDOWN after guest-shutdown", since=t0)
        check(ev["data"] == {"guest": True, "reason": "guest-shutdown"}, f"SHUTDOWN event data: {ev}")
        rc = g.wait_exit(30)
        check(rc == 0, f"QEMU exit code after guest-shutdown: {rc}")
        tm.add(g.name, "guest-shutdown -> QEMU exited 0", now() - t0)
    finally:
        g.kill()


def case_ppc_budget(args, tr, tm):
    """pseries, maxcpus=2: boot core + plug core 1 + unplug + re-plug = 3rd vCPU thread."""
    g = Guest(args, "ppc-budget", "1,maxcpus=2,cores=2,threads=1", [], tr)
    try:
        tm.boot.append(g.start(tm))
        s1 = slot_of(hotpluggable(g), **{"core-id": 1})
        n = ppc_plug(g, tm, s1, "core1")
        ppc_unplug(g, tm, "core1", n, 1)
        try:
            r = g.qmp.execute("device_add", {"driver": s1["type"], "id": "core1b", **s1["props"]},
                              allow_error=True, timeout=20)
        except (SmokeError, OSError) as e:
            r = {"no_reply": str(e)}
        rc, out = qemu_died(g)
        tr.note({"replug_past_budget": {"reply": r, "qemu_exit": rc, "qemu_output": out}})
        print(f"  3rd vCPU creation with maxcpus=2: reply {json.dumps(r)}, exit {rc}, output {out!r}", flush=True)
        check(rc is not None and "tcg_max_ctxs" in out,
              f"QEMU should abort on the (maxcpus+1)-th vCPU thread (tcg_max_ctxs): exit {rc}, {out}")
    finally:
        g.kill()


PPC_CASES = {"ppc-threads1": case_ppc_threads1, "ppc-threads2": case_ppc_threads2, "ppc-budget": case_ppc_budget}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="x86_64", choices=sorted(ARCHES), help="guest architecture (default: x86_64)")
    ap.add_argument("--kernel", default=None, help="default: the build.sh output for --arch")
    ap.add_argument("--initrd", default=None, help="default: the build.sh output for --arch")
    ap.add_argument("--qemu", default=None, help="default: qemu-system-x86_64 / qemu-system-ppc64")
    ap.add_argument("--sandbox", default="on", help="QEMU -sandbox value (default: on)")
    ap.add_argument("--cpu", default=None, help=f"QEMU -cpu model (default: {DEFAULT_CPU} / POWER9)")
    ap.add_argument("--case", action="append", choices=sorted(CASES) + sorted(PPC_CASES),
                    help="run only these cases (repeatable; they must belong to --arch)")
    ap.add_argument("--workdir", default=None, help="where sockets and logs go (default: a temp dir, kept on failure)")
    ap.add_argument("--transcript", default=None, help="write every QMP/QGA message as JSON lines here")
    ap.add_argument("--verbose", action="store_true", help="print every QMP/QGA message")
    args = ap.parse_args()
    arch = ARCHES[args.arch]
    guest_dir = os.path.join(CACHE, "guest", args.arch)
    args.kernel = args.kernel or os.path.join(guest_dir, "vmlinux")
    args.initrd = args.initrd or os.path.join(guest_dir, "initramfs.cpio.gz")
    args.qemu = args.qemu or arch["qemu"]
    args.cpu = args.cpu or arch["cpu"]
    cases = PPC_CASES if args.arch == "ppc64le" else CASES
    wrong = [c for c in args.case or [] if c not in cases]
    if wrong:
        print(f"smoke.py: --case {', '.join(wrong)} is not a case for --arch {args.arch} "
              f"(its cases: {', '.join(cases)})", file=sys.stderr)
        return 2

    for what, path in (("kernel", args.kernel), ("initrd", args.initrd)):
        if not os.path.isfile(path):
            print(f"smoke.py: {what} {path} not found: run node-vmm/guest/build.sh --arch {args.arch} first",
                  file=sys.stderr)
            return 2
    if shutil.which(args.qemu) is None:
        print(f"smoke.py: {args.qemu} not found: install {arch['package']} (scripts/install-deps.sh)", file=sys.stderr)
        return 2
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="corescale-smoke.")
    os.makedirs(args.workdir, exist_ok=True)

    tr = Transcript(args.transcript, args.verbose)
    tm = Timings()
    tm.boot = []
    failed = []
    for name in args.case or list(cases):
        print(f"== case {name}", flush=True)
        tr.case = name
        try:
            cases[name](args, tr, tm)
            print(f"   {name}: ok", flush=True)
        except SmokeError as e:
            print(f"   {name}: FAILED: {e}", flush=True)
            failed.append(name)
    if tm.boot:
        print(f"boot to agent ready: min {min(tm.boot):.2f}s max {max(tm.boot):.2f}s over {len(tm.boot)} boots")
    ran = len(args.case or cases)
    print(f"{ran - len(failed)} passed, {len(failed)} failed")
    if failed:
        print(f"logs kept in {args.workdir}", file=sys.stderr)
        return 1
    if own_workdir:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
