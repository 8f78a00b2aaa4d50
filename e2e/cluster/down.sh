#!/usr/bin/env bash
# Stop the control plane that up.sh started in DIR: kube-controller-manager,
# kube-apiserver, then etcd, each by the pid up.sh recorded (and only if that
# pid still runs the binary up.sh started, so a recycled pid is never hit).
# SIGTERM first, SIGKILL after CORESCALE_STOP_TIMEOUT seconds (default 10).
# Idempotent: stopping a stopped or never-started cluster succeeds.
#
# Usage: down.sh [--dir DIR] [--purge]   (--purge also deletes DIR)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="$repo/e2e/.run/cluster"
purge=0

while [[ $# -gt 0 ]]; do
	case "$1" in
	--dir)
		[[ $# -ge 2 && -n "$2" ]] || {
			echo "down.sh: --dir needs a directory" >&2
			exit 2
		}
		dir="$2"
		shift 2
		;;
	--dir=*)
		dir="${1#--dir=}"
		shift
		;;
	--purge)
		purge=1
		shift
		;;
	-h | --help)
		awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
		exit 0
		;;
	*)
		echo "down.sh: unknown argument '$1' (expected --dir DIR, --purge)" >&2
		exit 2
		;;
	esac
done

log() { echo "down.sh: $*" >&2; }
stop_timeout="${CORESCALE_STOP_TIMEOUT:-10}"
[[ "$stop_timeout" =~ ^[0-9]+$ ]] || {
	log "CORESCALE_STOP_TIMEOUT must be a whole number of seconds, got '$stop_timeout'"
	exit 2
}

if [[ ! -d "$dir" ]]; then
	log "nothing to stop: $dir does not exist"
	exit 0
fi

# The pid is ours only if it still runs the binary we started.
ours() { # pid name
	local exe
	exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
	case "$2" in
	etcd) [[ "$(basename "$exe")" == etcd* ]] ;;
	*) [[ "$(basename "$exe")" == "$2"* ]] ;;
	esac
}

stopped_any=0
for name in kube-controller-manager kube-apiserver etcd; do
	pidfile="$dir/run/$name.pid"
	[[ -f "$pidfile" ]] || continue
	pid="$(cat "$pidfile")"
	if [[ ! "$pid" =~ ^[0-9]+$ ]]; then
		log "ignoring $pidfile: '$pid' is not a pid"
		rm -f "$pidfile"
		continue
	fi
	if ! ours "$pid" "$name"; then
		rm -f "$pidfile"
		continue
	fi
	kill -TERM "$pid" 2>/dev/null || true
	deadline=$(($(date +%s) + stop_timeout))
	while ours "$pid" "$name" && [[ $(date +%s) -lt $deadline ]]; do
		# An exited process that is not yet reaped (a zombie) has no
		# readable /proc/PID/exe, so ours() is already false for it.
		sleep 0.1
	done
	if ours "$pid" "$name"; then
		log "$name (pid $pid) ignored SIGTERM for ${stop_timeout}s: SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
		for _ in $(seq 50); do
			ours "$pid" "$name" || break
			sleep 0.1
		done
	fi
	if ours "$pid" "$name"; then
		log "$name (pid $pid) is still running"
		exit 1
	fi
	log "stopped $name (pid $pid)"
	rm -f "$pidfile"
	stopped_any=1
done

# The env file describes a running cluster: remove it so nobody sources a dead one.
rm -f "$dir/env"
[[ $stopped_any -eq 1 ]] || log "nothing was running in $dir"
if [[ $purge -eq 1 ]]; then
	rm -rf "$dir"
	log "removed $dir"
fi
