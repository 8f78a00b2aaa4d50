#!/usr/bin/env bash
# Installs every system package corescale's build, tests and e2e need, from Debian's
# registries only. Idempotent: a second run only checks.
#
# Usage: install-deps.sh [--node]   --node: also what a real kubelet node needs
#                                   (`make node-e2e`; not part of `make ci`)
set -euo pipefail

need_root() { if [ "$(id -u)" -ne 0 ]; then echo "install-deps: run as root (apt-get)" >&2; exit 1; fi; }

BACKPORTS=/etc/apt/sources.list.d/corescale-bookworm-backports.sources
# kmod: depmod, which the guest image build runs on the kernel package it packs.
# The Debian disk image (node-vmm/guest/build-disk.sh): mmdebstrap (the root file system),
# e2fsprogs (mkfs.ext4 -d), dosfstools + mtools (the boot check's NoCloud seed, a vfat
# image labelled cidata, without mounts), openssh-client (the boot check and e2e log in).
pkgs_main=(busybox-static cpio kmod binutils prometheus curl jq zstd xz-utils python3-venv python3-yaml openssl
           mmdebstrap e2fsprogs dosfstools mtools openssh-client)
# A real kubelet node (e2e/node, `make node-e2e`): containerd + runc (crun cannot run on
# these hosts' hybrid cgroups), the CNI bridge plugins, podman/buildah to build the
# Dockerfile's images with no Docker engine (mmdebstrap, for the local base images, is in
# the base list: the guest disk image needs it too), and what kubelet/kube-proxy call
# (iptables, conntrack, socat).
if [ "${1:-}" = --node ]; then
  pkgs_main+=(containerd runc containernetworking-plugins podman buildah conntrack socat iptables)
elif [ -n "${1:-}" ]; then
  echo "install-deps: unknown argument '$1' (expected --node)" >&2; exit 2
fi
# QEMU 10.0 from bookworm-backports: Debian 12's QEMU 7.2 crashes (double free) on the
# first CPU device_add after a device_del under TCG.
# qemu-system-ppc (qemu-system-ppc64) for POWER/pseries guests, from the same backports
# release: core hot-plug and the TCG behaviour node-vmm relies on were measured with 10.0.
# qemu-system-arm (qemu-system-aarch64) for arm64 guests on the virt machine (resizeMethod
# GuestOnline: virt cannot hot-plug CPUs), the same QEMU 10.
pkgs_bpo=(qemu-system-x86 qemu-system-ppc qemu-system-arm qemu-utils)

missing=()
for p in "${pkgs_main[@]}" "${pkgs_bpo[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
qemu_ok=1
for q in qemu-system-x86_64 qemu-system-ppc64 qemu-system-aarch64; do
  v=$(command -v "$q" >/dev/null && "$q" --version | head -1 | sed -E 's/.*version ([0-9]+)\..*/\1/' || true)
  case $v in ''|*[!0-9]*) qemu_ok=0 ;; *) [ "$v" -ge 10 ] || qemu_ok=0 ;; esac
done
if [ ${#missing[@]} -eq 0 ] && [ $qemu_ok -eq 1 ]; then
  echo "install-deps: all system packages present"; exit 0
fi
need_root
if [ ! -f "$BACKPORTS" ]; then
  cat > "$BACKPORTS" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs_main[@]}"
apt-get install -y -qq --no-install-recommends -t bookworm-backports "${pkgs_bpo[@]}"
qemu-system-x86_64 --version | head -1
qemu-system-ppc64 --version | head -1
qemu-system-aarch64 --version | head -1
