#!/usr/bin/env bash
# Build corescale's images from the project's Dockerfile with podman, with no image
# registry: the base images its FROM lines name are made here first.
#
#   debian:bookworm(-slim)   mmdebstrap --variant=minbase (cached as a tar)
#   rust:<RUST_VERSION>-bookworm   this machine's Rust toolchain + gcc (images/rust.Containerfile)
#   gcr.io/distroless/cc-debian12:nonroot   glibc + libgcc + CA certs, user 65532
#                                           (images/distroless-cc.Containerfile)
#   localhost/corescale/pause:3.10   a static pause in FROM scratch (containerd's sandbox_image)
#
# then `podman build --target operator|node-vmm` of the Dockerfile, tagged
# localhost/corescale-{operator,node-vmm}:<hash of the build inputs> (skipped when that
# tag exists), and with --load SOCKET imports all into that containerd (namespace k8s.io).
# Podman's storage lives under $CORESCALE_CACHE/images (not /var/lib/containers); builds
# use the host network (no podman bridge or iptables rules).
#
# Usage: images.sh [--load CONTAINERD_SOCKET] [--pause-only]
#   prints `operator=REF node-vmm=REF pause=REF` (--pause-only: `pause=REF`, the only image
#   a node needs to start; e2e/node/up.sh loads it so)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${CORESCALE_CACHE:-$HOME/.cache/corescale}/images"
load_sock=""
pause_only=0
while [[ $# -gt 0 ]]; do
	case "$1" in
	--pause-only) pause_only=1; shift ;;
	--load) load_sock="${2:?--load needs the containerd socket}"; shift 2 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "images.sh: unknown argument '$1'" >&2; exit 2 ;;
	esac
done

log() { echo "images.sh: $*" >&2; }
die() { log "$*"; exit 1; }
for t in podman mmdebstrap gcc rustc; do
	command -v "$t" >/dev/null || die "'$t' is missing: run 'bash scripts/install-deps.sh' (rustc: rustup)"
done
[[ -z "$load_sock" ]] || command -v ctr >/dev/null || die "'ctr' is missing: run 'bash scripts/install-deps.sh'"

mkdir -p "$cache/tmp"
# buildah keeps RUN --mount=type=cache directories under $TMPDIR: keep cargo's there.
export TMPDIR="$cache/tmp"
pm() {
	podman --root "$cache/podman-root" --runroot "$cache/podman-runroot" --storage-driver overlay \
		--cgroup-manager cgroupfs --events-backend file --runtime runc "$@"
}
have() { pm image exists "$1"; }
build() { pm build --pull=never --network host --layers "$@"; }
t0=$(date +%s)
stage() { log "$1 ($(($(date +%s) - t0)) s)"; }

load() { # ref...
	local ref
	for ref in "$@"; do
		if ctr --address "$load_sock" -n k8s.io images ls -q | grep -qxF "$ref"; then
			continue
		fi
		stage "loading $ref into containerd"
		pm save --format docker-archive "$ref" | ctr --address "$load_sock" -n k8s.io images import - >/dev/null
	done
}

# --- pause ----------------------------------------------------------------------------
pause_ref=localhost/corescale/pause:3.10
if ! have "$pause_ref"; then
	stage "pause image"
	ctx="$cache/pause-context"
	rm -rf "$ctx" && mkdir -p "$ctx"
	gcc -static -Os -s -o "$ctx/pause" "$here/images/pause.c"
	build -t "$pause_ref" -f "$here/images/pause.Containerfile" "$ctx" >&2
	rm -rf "$ctx"
fi
if [[ $pause_only -eq 1 ]]; then
	[[ -z "$load_sock" ]] || load "$pause_ref"
	echo "pause=$pause_ref"
	exit 0
fi

# --- Debian base -------------------------------------------------------------------
base_tar="$cache/debian-bookworm.tar"
if [[ ! -f "$base_tar" ]]; then
	stage "mmdebstrap bookworm minbase"
	mmdebstrap --quiet --variant=minbase --format=tar --include=ca-certificates bookworm "$base_tar.tmp.tar" \
		"deb http://deb.debian.org/debian bookworm main" \
		"deb http://deb.debian.org/debian bookworm-updates main" \
		"deb http://deb.debian.org/debian-security bookworm-security main"
	mv "$base_tar.tmp.tar" "$base_tar"
fi
if ! have localhost/corescale/debian:bookworm; then
	stage "podman import of the base"
	pm import --change 'CMD ["/bin/bash"]' "$base_tar" localhost/corescale/debian:bookworm >/dev/null
fi
for n in docker.io/library/debian:bookworm docker.io/library/debian:bookworm-slim; do
	pm tag localhost/corescale/debian:bookworm "$n"
done

# --- Rust builder from this machine's toolchain -----------------------------------
rust_version="$(sed -nE 's/^ARG RUST_VERSION=([0-9.]+)$/\1/p' "$repo/Dockerfile")"
[[ -n "$rust_version" ]] || die "no 'ARG RUST_VERSION=' in the Dockerfile"
sysroot="$(rustc --print sysroot)"
local_version="$(rustc --version | awk '{print $2}')"
[[ "$local_version" == "$rust_version" || "$local_version" == "$rust_version".* ]] ||
	die "the Dockerfile wants Rust $rust_version but this machine's rustc is $local_version (rustup toolchain install $rust_version, or change ARG RUST_VERSION)"
rust_ref="docker.io/library/rust:$rust_version-bookworm"
local_ca=(/usr/local/share/ca-certificates/*.crt)
[[ -e "${local_ca[0]}" ]] || local_ca=()
rust_id="rust-$local_version-$(cat "$here/images/rust.Containerfile" "${local_ca[@]}" | sha256sum | cut -c1-12)"
if ! have "localhost/corescale/rust:$rust_id"; then
	stage "builder image rust $local_version from $sysroot"
	ctx="$cache/rust-context"
	rm -rf "$ctx" && mkdir -p "$ctx/toolchain/bin" "$ctx/toolchain/lib/rustlib"
	cp "$here/images/rust.Containerfile" "$ctx/Containerfile"
	mkdir -p "$ctx/local-ca"
	[[ ${#local_ca[@]} -eq 0 ]] || cp "${local_ca[@]}" "$ctx/local-ca/"
	# The compiler, cargo and the x86_64 std only (no docs, no sources: 1.4 -> 0.6 GB).
	cp -l "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$sysroot/bin/rustdoc" "$ctx/toolchain/bin/" 2>/dev/null ||
		cp "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$sysroot/bin/rustdoc" "$ctx/toolchain/bin/"
	cp -a "$sysroot"/lib/*.so* "$ctx/toolchain/lib/"
	cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu" "$sysroot/lib/rustlib/etc" "$ctx/toolchain/lib/rustlib/" 2>/dev/null ||
		cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu" "$ctx/toolchain/lib/rustlib/"
	[[ -d "$sysroot/libexec" ]] && cp -a "$sysroot/libexec" "$ctx/toolchain/"
	build -t "localhost/corescale/rust:$rust_id" "$ctx" >&2
	rm -rf "$ctx"
fi
pm tag "localhost/corescale/rust:$rust_id" "$rust_ref"

# --- distroless stand-in -------------------------------------------------
dl_id="$(sha256sum "$here/images/distroless-cc.Containerfile" | cut -c1-12)"
if ! have "localhost/corescale/distroless-cc:$dl_id"; then
	stage "distroless cc stand-in"
	build -t "localhost/corescale/distroless-cc:$dl_id" -f "$here/images/distroless-cc.Containerfile" "$here/images" >&2
fi
pm tag "localhost/corescale/distroless-cc:$dl_id" gcr.io/distroless/cc-debian12:nonroot
# --- the project's images ----------------------------------------------------------
# Input hash: the Dockerfile, .dockerignore, every file of the paths it copies, and the
# base images' ids.
inputs_hash="$(
	cd "$repo"
	{
		sha256sum Dockerfile .dockerignore
		git ls-files -co --exclude-standard -- Cargo.toml Cargo.lock rustfmt.toml api common operator node-vmm e2e/Cargo.toml e2e/src |
			sort | while read -r f; do [[ -f "$f" ]] && sha256sum "$f"; done
		for b in localhost/corescale/debian:bookworm "$rust_ref" gcr.io/distroless/cc-debian12:nonroot; do
			pm image inspect --format '{{.Id}}' "$b"
		done
	} | sha256sum | cut -c1-12
)"
refs=()
for target in operator node-vmm; do
	ref="localhost/corescale-$target:h-$inputs_hash"
	if ! have "$ref"; then
		stage "podman build --target $target (Dockerfile inputs $inputs_hash)"
		build --target "$target" -t "$ref" -f "$repo/Dockerfile" "$repo" >&2
	fi
	refs+=("$ref")
done
stage "images ready"

# --- into containerd ---------------------------------------------------------------
if [[ -n "$load_sock" ]]; then
	load "${refs[@]}" "$pause_ref"
	stage "images loaded"
fi
echo "operator=${refs[0]} node-vmm=${refs[1]} pause=$pause_ref"
