#!/usr/bin/env bash
# Build KEDA (the operator and its external-metrics API server) from Go modules into
# ${CORESCALE_CACHE:-$HOME/.cache/corescale}/keda/<version>/bin/{keda,keda-adapter}.
#
# KEDA's go.mod carries replace and exclude lines, which only count in the main module,
# so the build runs inside KEDA's own module (downloaded from the Go module proxy into the
# module cache, go.sum included): the binaries are built from exactly what upstream pins,
# with upstream's version ldflags. Nothing but the Go module proxy is needed. The build is
# skipped when both binaries are there; the module and build caches are shared with
# build-kube.sh.
#
# Usage: build-keda.sh [--force]     prints the bin directory on its last line.
# Env:   CORESCALE_CACHE, KEDA_BUILD_JOBS (go build -p, default: number of cores).
set -euo pipefail

# v2.21.1 declares `go 1.27.4`; v2.21.0 builds with the Go 1.26 this project installs,
# so no toolchain is downloaded.
KEDA_VERSION=v2.21.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CORESCALE_CACHE:-$HOME/.cache/corescale}"
bin_dir="$cache/keda/$KEDA_VERSION/bin"
force=0
for arg in "$@"; do
	case "$arg" in
	--force) force=1 ;;
	-h | --help)
		awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
		exit 0
		;;
	*)
		echo "build-keda.sh: unknown argument '$arg' (expected --force)" >&2
		exit 2
		;;
	esac
done

binaries=(keda keda-adapter)
if [[ $force -eq 0 && -x "$bin_dir/keda" && -x "$bin_dir/keda-adapter" ]]; then
	echo "build-keda.sh: KEDA $KEDA_VERSION already built" >&2
	echo "$bin_dir"
	exit 0
fi

# shellcheck source=e2e/cluster/go-env.sh
source "$here/go-env.sh"
go_env build-keda.sh 1.26 "-mod=readonly -buildvcs=false"

start=$(date +%s)
# An empty scratch module lets `go mod download` fetch KEDA's module (with its go.sum).
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && "$GO" mod init corescale.dev/keda-fetch >/dev/null 2>&1 &&
	"$GO" mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" >"$scratch/dl.json")
src="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["Dir"])' "$scratch/dl.json")"
[[ -f "$src/go.sum" ]] || {
	echo "build-keda.sh: $src has no go.sum; cannot build KEDA $KEDA_VERSION reproducibly" >&2
	exit 1
}

# Upstream's Makefile: GO_LDFLAGS="-X=github.com/kedacore/keda/v2/version.GitCommit=... -X=...Version=..."
ldflags="-s -w -X=github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v}"
ldflags+=" -X=github.com/kedacore/keda/v2/version.GitCommit=$KEDA_VERSION"
jobs="${KEDA_BUILD_JOBS:-$(nproc)}"
cd "$src"
echo "build-keda.sh: building KEDA $KEDA_VERSION ($("$GO" version))" >&2
"$GO" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$bin_dir/.keda.tmp" ./cmd/operator
mv -f "$bin_dir/.keda.tmp" "$bin_dir/keda"
"$GO" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$bin_dir/.keda-adapter.tmp" ./cmd/adapter
mv -f "$bin_dir/.keda-adapter.tmp" "$bin_dir/keda-adapter"
echo "build-keda.sh: built ${binaries[*]} in $(($(date +%s) - start)) s into $bin_dir" >&2
echo "$bin_dir"
