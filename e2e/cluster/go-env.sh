# shellcheck shell=bash
# The Go environment of the build-*.sh scripts, sourced by them: one toolchain lookup and
# one cache layout under $CORESCALE_CACHE/go for every Go build of the e2e stack.

# The caller sets cache and bin_dir.
# shellcheck disable=SC2154

# go_env NAME MIN_GO GOFLAGS: set GO (a go binary: $GO, else go on PATH, else
# /usr/local/go/bin/go), the module and build caches under $cache/go, GOFLAGS, no cgo and
# the local toolchain only (no toolchain download, whatever a go.mod asks), and create
# the caches and $bin_dir. NAME prefixes the error; MIN_GO is what it tells users to install.
go_env() {
	local name="$1" min_go="$2" goflags="$3"
	GO="${GO:-}"
	if [[ -z "$GO" ]]; then
		if command -v go >/dev/null 2>&1; then
			GO="$(command -v go)"
		elif [[ -x /usr/local/go/bin/go ]]; then
			GO=/usr/local/go/bin/go
		else
			echo "$name: no Go toolchain found; install Go >= $min_go (go on PATH or /usr/local/go/bin/go)" >&2
			exit 1
		fi
	fi
	export GOMODCACHE="$cache/go/mod"
	export GOCACHE="$cache/go/build"
	export GOFLAGS="$goflags"
	export CGO_ENABLED=0
	export GOTOOLCHAIN=local
	mkdir -p "$GOMODCACHE" "$GOCACHE" "$bin_dir"
}
