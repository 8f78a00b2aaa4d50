#!/usr/bin/env bash
# Build etcd from Go modules (the wrapper module in e2e/go/etcd) into
# ${CORESCALE_CACHE:-$HOME/.cache/corescale}/etcd/<version>/bin/etcd.
#
# Why not Debian's etcd-server: bookworm ships 3.4.23. Kubernetes 1.35 is
# supported on etcd 3.6 (kubeadm ships 3.6.x). kube-apiserver 1.35 does start on
# 3.4.23, but logs "RequestWatchProgress feature is not supported" and then
# serves consistent lists from etcd instead of its watch cache, unlike a real
# cluster; and 3.4 has no --unsafe-no-fsync. etcd 3.6 builds in ~35 s.
# (up.sh still runs any etcd given as CORESCALE_ETCD_BIN=/usr/bin/etcd.)
# The build is skipped when the binary is already there.
#
# Usage: build-etcd.sh [--force]     prints the bin directory on its last line.
set -euo pipefail

# Must match the go.etcd.io/etcd/server/v3 version in e2e/go/etcd/go.mod.
ETCD_VERSION=v3.6.16

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module_dir="$(cd "$here/../go/etcd" && pwd)"
cache="${CORESCALE_CACHE:-$HOME/.cache/corescale}"
bin_dir="$cache/etcd/$ETCD_VERSION/bin"
force=0

for arg in "$@"; do
	case "$arg" in
	--force) force=1 ;;
	-h | --help)
		awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
		exit 0
		;;
	*)
		echo "build-etcd.sh: unknown argument '$arg' (expected --force)" >&2
		exit 2
		;;
	esac
done

if ! grep -qE "^(require|\s+)\s*go.etcd.io/etcd/server/v3 $ETCD_VERSION" "$module_dir/go.mod"; then
	echo "build-etcd.sh: ETCD_VERSION=$ETCD_VERSION does not match go.etcd.io/etcd/server/v3 in $module_dir/go.mod" >&2
	exit 1
fi

if [[ $force -eq 0 && -x "$bin_dir/etcd" ]]; then
	echo "build-etcd.sh: etcd $ETCD_VERSION already built" >&2
	echo "$bin_dir"
	exit 0
fi

# shellcheck source=e2e/cluster/go-env.sh
source "$here/go-env.sh"
# -buildvcs=false: the wrapper module sits inside the corescale git tree, whose
# VCS state is irrelevant to these binaries (and unreadable in some CI clones).
go_env build-etcd.sh 1.26 "-mod=mod -buildvcs=false ${GOFLAGS:-}"

cd "$module_dir"
start=$(date +%s)
echo "build-etcd.sh: building etcd $ETCD_VERSION ($("$GO" version))" >&2
"$GO" build -p "${KUBE_BUILD_JOBS:-$(nproc)}" -trimpath -ldflags "-s -w" \
	-o "$bin_dir/.etcd.tmp" go.etcd.io/etcd/server/v3
mv -f "$bin_dir/.etcd.tmp" "$bin_dir/etcd"
echo "build-etcd.sh: built etcd in $(($(date +%s) - start)) s into $bin_dir" >&2
echo "$bin_dir"
