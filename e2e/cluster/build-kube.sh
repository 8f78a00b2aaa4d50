#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager and kubectl from Go modules (the
# wrapper module in e2e/go/kube) into ${CORESCALE_CACHE:-$HOME/.cache/corescale}/kube/<version>/bin/.
# kubectl comes along so clients match the server's version on any machine.
# With --node also kubelet, kube-scheduler and kube-proxy (for e2e/node: a real
# kubelet node); only the binaries missing from the bin dir are built.
#
# Nothing but the Go module proxy is needed: no Kubernetes release tarballs, no
# Docker. The build is skipped when all binaries are already there, and the Go
# module and build caches live under the same cache dir, so a re-run after a
# change to the wrapper module is incremental.
#
# Usage: build-kube.sh [--force] [--node]     prints the bin directory on its last line.
# Env:   CORESCALE_CACHE, KUBE_BUILD_JOBS (go build -p, default: number of cores).
set -euo pipefail

# Must match the k8s.io/kubernetes version in e2e/go/kube/go.mod.
KUBE_VERSION=v1.35.4

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module_dir="$(cd "$here/../go/kube" && pwd)"
cache="${CORESCALE_CACHE:-$HOME/.cache/corescale}"
bin_dir="$cache/kube/$KUBE_VERSION/bin"
force=0
node=0

for arg in "$@"; do
	case "$arg" in
	--force) force=1 ;;
	--node) node=1 ;;
	-h | --help)
		awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
		exit 0
		;;
	*)
		echo "build-kube.sh: unknown argument '$arg' (expected --force or --node)" >&2
		exit 2
		;;
	esac
done

if ! grep -q "^require k8s.io/kubernetes $KUBE_VERSION" "$module_dir/go.mod" &&
	! grep -qE "^\s+k8s.io/kubernetes $KUBE_VERSION" "$module_dir/go.mod"; then
	echo "build-kube.sh: KUBE_VERSION=$KUBE_VERSION does not match the k8s.io/kubernetes line in $module_dir/go.mod" >&2
	exit 1
fi

binaries=(kube-apiserver kube-controller-manager kubectl)
if [[ $node -eq 1 ]]; then
	binaries+=(kubelet kube-scheduler kube-proxy)
fi

have_all() {
	local b
	for b in "${binaries[@]}"; do
		[[ -x "$bin_dir/$b" ]] || return 1
	done
}

if [[ $force -eq 0 ]] && have_all; then
	echo "build-kube.sh: $KUBE_VERSION already built" >&2
	echo "$bin_dir"
	exit 0
fi

# shellcheck source=e2e/cluster/go-env.sh
source "$here/go-env.sh"
# -buildvcs=false: the wrapper module sits inside the corescale git tree, whose
# VCS state is irrelevant to these binaries (and unreadable in some CI clones).
# GOTOOLCHAIN=local (go_env): the wrapper module's go line (1.25) is older than any
# toolchain we use; never let `go` try to download a different one.
go_env build-kube.sh 1.25 "-mod=mod -buildvcs=false ${GOFLAGS:-}"

# Same flags as upstream's static builds (hack/lib/golang.sh, hack/lib/version.sh):
# without gitVersion, /version reports v0.0.0-master.
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
minor="${KUBE_VERSION#v1.}"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
jobs="${KUBE_BUILD_JOBS:-$(nproc)}"

cd "$module_dir"
start=$(date +%s)
built=()
for b in "${binaries[@]}"; do
	if [[ $force -eq 0 && -x "$bin_dir/$b" ]]; then
		continue
	fi
	built+=("$b")
	echo "build-kube.sh: building $b $KUBE_VERSION ($("$GO" version))" >&2
	# Build to a temporary name so an interrupted build never looks finished.
	"$GO" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$bin_dir/.$b.tmp" "k8s.io/kubernetes/cmd/$b"
	mv -f "$bin_dir/.$b.tmp" "$bin_dir/$b"
done
echo "build-kube.sh: built ${built[*]} in $(($(date +%s) - start)) s into $bin_dir" >&2
echo "$bin_dir"
