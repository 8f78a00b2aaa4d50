#!/usr/bin/env bash
# Stop what e2e/node/up.sh started and remove what it created: kube-proxy (and its
# iptables/nftables rules: `kube-proxy --cleanup`), kube-scheduler, kubelet, every
# container and sandbox of its containerd (tasks killed, so no shim or container
# outlives it), containerd, the API server forward, the control plane (cluster/down.sh),
# mounts left under DIR, the kubelet's kubepods cgroups, the bridge, the sysctls (back to
# DIR/sysctl.saved) and /var/lib/corescale if the run created it. Idempotent.
#
# Usage: down.sh [--dir DIR] [--purge]   (default DIR: e2e/.run/node; --purge also
#        deletes DIR: containerd's image store, logs)
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$repo/e2e/.run/node"
purge=0
while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir) dir="${2:?--dir needs a directory}"; shift 2 ;;
	--purge) purge=1; shift ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "down.sh: unknown argument '$1'" >&2; exit 2 ;;
	esac
done
log() { echo "node/down.sh: $*" >&2; }
[[ -d "$dir" ]] || { log "nothing in $dir"; exit 0; }
dir="$(cd "$dir" && pwd)"

# A pid is ours only while it still runs the binary we started.
ours() { [[ -f "$dir/run/$1.pid" ]] && [[ "$(readlink "/proc/$(cat "$dir/run/$1.pid")/exe" 2>/dev/null)" == "$(cat "$dir/run/$1.exe")" ]]; }
stop() { # name [grace seconds]
	local name="$1" grace="${2:-15}" pid i
	if ours "$name"; then
		pid="$(cat "$dir/run/$name.pid")"
		kill -TERM "$pid" 2>/dev/null
		for ((i = 0; i < grace * 5; i++)); do ours "$name" || break; sleep 0.2; done
		if ours "$name"; then
			log "$name (pid $pid) ignored SIGTERM: SIGKILL"
			kill -KILL "$pid" 2>/dev/null
			sleep 0.5
		fi
	fi
	rm -f "$dir/run/$name.pid" "$dir/run/$name.exe"
}

kbin=""
# shellcheck disable=SC1091
[[ -f "$dir/cluster/env" ]] && kbin="$(. "$dir/cluster/env" && echo "$CORESCALE_KUBE_BIN_DIR")"
sock="$dir/containerd/containerd.sock"

stop kube-proxy
if [[ -x "$kbin/kube-proxy" ]]; then
	# Removes the KUBE-* chains of both iptables and nftables modes.
	"$kbin/kube-proxy" --cleanup >>"$dir/logs/kube-proxy-cleanup.log" 2>&1 || log "kube-proxy --cleanup failed (see $dir/logs/kube-proxy-cleanup.log)"
fi
stop kube-scheduler
stop kubelet 30
# The kubelet's own chains (kube-proxy --cleanup leaves them): KUBE-FIREWALL (hooked
# into INPUT and OUTPUT), KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT, in IPv4 and IPv6.
for ipt in iptables ip6tables; do
	command -v "$ipt" >/dev/null || continue
	for table in filter nat mangle; do
		for chain in INPUT OUTPUT; do
			while "$ipt" -t "$table" -D "$chain" -j KUBE-FIREWALL 2>/dev/null; do :; done
		done
		for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
			"$ipt" -t "$table" -F "$chain" 2>/dev/null && "$ipt" -t "$table" -X "$chain" 2>/dev/null
		done
	done
done

# Containers keep running under their shims when containerd stops: kill every task of
# this containerd (containers first, sandboxes last) and delete it.
if ours containerd && [[ -S "$sock" ]]; then
	c() { timeout 30 ctr --address "$sock" "$@"; }
	for ns in $(c namespaces ls -q 2>/dev/null); do
		for t in $(c -n "$ns" tasks ls -q 2>/dev/null); do
			c -n "$ns" tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1
		done
		for t in $(c -n "$ns" tasks ls -q 2>/dev/null); do
			for _ in 1 2 3 4 5 6 7 8 9 10; do
				c -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 && break
				sleep 0.5
			done
		done
		for ctn in $(c -n "$ns" containers ls -q 2>/dev/null); do
			c -n "$ns" containers delete "$ctn" >/dev/null 2>&1
		done
	done
fi
stop containerd 20
# Shims of this containerd that survived (matched by our socket on their command line).
for p in /proc/[0-9]*; do
	if [[ "$(readlink "$p/exe" 2>/dev/null)" == */containerd-shim-runc-v2 ]] &&
		tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $sock"; then
		log "killing leftover shim ${p#/proc/}"
		kill -KILL "${p#/proc/}" 2>/dev/null
	fi
done
# socat forks a child per connection, in its process group (setsid in up.sh): stop them all.
if ours apiserver-forward; then
	kill -TERM -- "-$(cat "$dir/run/apiserver-forward.pid")" 2>/dev/null
fi
stop apiserver-forward 5
[[ -x "$repo/e2e/cluster/down.sh" && -d "$dir/cluster" ]] && "$repo/e2e/cluster/down.sh" --dir "$dir/cluster"

# Mounts left under DIR (pod volumes, sandbox netns/shm, overlay rootfs), deepest first.
for _ in 1 2 3; do
	mapfile -t mnts < <(awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
	[[ ${#mnts[@]} -eq 0 ]] && break
	for m in "${mnts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done
# The kubelet's cgroups (cgroupfs driver): empty once every container is gone.
for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/*/kube-proxy; do
	[[ -d "$root" ]] && find "$root" -depth -type d -exec rmdir {} + 2>/dev/null
	[[ -d "$root" ]] && log "cgroup $root is not empty yet"
done
# The bridge and the pods' veths (deleted with their netns; a leftover end goes here).
if [[ -f "$dir/run/bridge" ]]; then
	br="$(cat "$dir/run/bridge")"
	for v in $(ip -o link show master "$br" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
		ip link del "$v" 2>/dev/null
	done
	ip link del "$br" 2>/dev/null
	rm -f "$dir/run/bridge"
fi
if [[ -f "$dir/sysctl.saved" ]]; then
	while IFS= read -r kv; do
		k="${kv%%=*}" v="${kv#*=}" f="/proc/sys/${k//.//}"
		[[ -f "$f" && "$(cat "$f")" != "$v" ]] && { echo "$v" >"$f" 2>/dev/null || log "could not restore $k=$v"; }
	done <"$dir/sysctl.saved"
	rm -f "$dir/sysctl.saved"
fi
if [[ -f "$dir/run/created-var-lib-corescale" ]]; then
	rm -rf /var/lib/corescale
	rm -f "$dir/run/created-var-lib-corescale"
fi
# containerd's shims put their sockets under /run/containerd/s, runc its state under
# /run/containerd/runc: empty directories once every task is gone.
[[ -d /run/containerd ]] && find /run/containerd -depth -type d -empty -delete 2>/dev/null
rm -f "$dir/env"
if [[ $purge -eq 1 ]]; then
	rm -rf "$dir"
fi
log "node stopped and cleaned up"
