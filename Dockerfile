# syntax=docker/dockerfile:1
#
# corescale images, one Dockerfile, two targets:
#
#   docker build --target operator -t ghcr.io/corescale/corescale-operator:0.1.0 .
#   docker build --target node-vmm -t ghcr.io/corescale/corescale-node-vmm:0.1.0 .
#
# operator  the operator binary on a distroless base: no shell, no QEMU, user 65532.
# node-vmm  the node agent/launcher binary, QEMU 10 from bookworm-backports (Debian 12's
#           QEMU 7.2 is not fit for CPU hot-plug, see scripts/install-deps.sh) and the
#           default guest image built by node-vmm/guest/build.sh from Debian packages.
#           Runs as 65532; the chart gives it /dev/kvm.
#
# No image registry is reachable on this project's machines, so `make images`
# (e2e/node/images.sh) builds this file with podman after making every base image it
# names locally: debian:bookworm(-slim) with mmdebstrap, rust:${RUST_VERSION}-bookworm from
# the machine's own Rust toolchain, and a stand-in for gcr.io/distroless/cc-debian12:nonroot
# (glibc, libgcc, CA certificates, user 65532, no shell): the operator image built there
# runs on that stand-in, not on Google's distroless. `make node-e2e` runs both images
# on a real kubelet node. `make chart-check` (scripts/check-dockerfile.sh) checks without
# building that every COPY/ADD source exists in the build context (after .dockerignore),
# that every `cargo build` names packages and binaries of the workspace (and builds
# them), and that what later stages copy from earlier ones is produced there.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

# --- both binaries -------------------------------------------------------------------
FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
# The whole workspace: cargo reads every member's manifest, even to build two of them.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY api api
COPY common common
COPY operator operator
COPY node-vmm node-vmm
COPY e2e/Cargo.toml e2e/Cargo.toml
COPY e2e/src e2e/src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p corescale-operator --bin corescale-operator \
        -p corescale-node-vmm --bin corescale-node-vmm \
 && mkdir -p /out \
 && cp target/release/corescale-operator target/release/corescale-node-vmm /out/

# --- the default guest image (kernel + initramfs with the QEMU guest agent) -----------
FROM docker.io/library/debian:${DEBIAN} AS guest
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils cpio kmod xz-utils zstd \
 && rm -rf /var/lib/apt/lists/*
COPY node-vmm/guest/build.sh node-vmm/guest/boot-check.sh node-vmm/guest/lib.sh /src/node-vmm/guest/
# build.sh downloads the Debian packages itself (apt-get download) into a scratch dir.
# This stage has no QEMU: the node-vmm stage boots each image once (boot-check.sh).
RUN bash /src/node-vmm/guest/build.sh --no-boot-check --arch x86_64 /out/guest/x86_64 \
 && bash /src/node-vmm/guest/build.sh --no-boot-check --arch ppc64le /out/guest/ppc64le \
 && bash /src/node-vmm/guest/build.sh --no-boot-check --arch aarch64 /out/guest/aarch64

# --- node-vmm: agent + launcher + QEMU ------------------------------------------------
FROM docker.io/library/debian:${DEBIAN}-slim AS node-vmm
ARG DEBIAN
RUN printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "${DEBIAN}" \
        > /etc/apt/sources.list.d/backports.sources \
 && apt-get update \
 && apt-get install -y --no-install-recommends -t "${DEBIAN}-backports" qemu-system-x86 qemu-system-ppc qemu-system-arm qemu-utils \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 corescale \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --shell /usr/sbin/nologin corescale
COPY --from=build /out/corescale-node-vmm /usr/local/bin/corescale-node-vmm
COPY --from=guest /out/guest /usr/share/corescale/guest
# Every image must answer its guest agent before the node image is made.
COPY node-vmm/guest/boot-check.sh /usr/local/lib/corescale/boot-check.sh
RUN bash /usr/local/lib/corescale/boot-check.sh --arch x86_64 /usr/share/corescale/guest/x86_64 \
 && bash /usr/local/lib/corescale/boot-check.sh --arch ppc64le /usr/share/corescale/guest/ppc64le \
 && bash /usr/local/lib/corescale/boot-check.sh --arch aarch64 /usr/share/corescale/guest/aarch64
ENV CORESCALE_IMAGE_DIR=/usr/share/corescale/guest
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/corescale-node-vmm"]
CMD ["agent"]

# --- operator --------------------------------------------------------------------------
# glibc and libgcc only (TLS is rustls); ":nonroot" runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/corescale-operator /usr/local/bin/corescale-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/corescale-operator"]
