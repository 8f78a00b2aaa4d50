#!/usr/bin/env bash
# What the e2e ran with, one line each: the guest images (kernel release and Debian package
# versions, from each image's manifest.json), QEMU, the control plane, Prometheus and KEDA. A red
# run then says which Debian packages it met.
set -uo pipefail
cache=${CORESCALE_CACHE:-$HOME/.cache/corescale}
for arch in x86_64 ppc64le aarch64; do
	m=$cache/guest/$arch/manifest.json
	if [[ -f $m ]]; then
		jq -r --arg a "$arch" '"guest \($a): kernel \(.kernel_release) (\(.packages | to_entries | map(select(.key | test("^linux-image-[a-z0-9]+$"))) | .[0] | "\(.key) \(.value)")), qemu-ga \(.packages["qemu-guest-agent"]), busybox \(.packages["busybox-static"]), boot check \(if .boot_check_seconds then "\(.boot_check_seconds) s" else "not run" end)"' "$m"
	else
		echo "guest $arch: no image ($m missing)"
	fi
done
for q in qemu-system-x86_64 qemu-system-ppc64 qemu-system-aarch64; do
	echo "$q: $("$q" --version 2>/dev/null | head -n1 || echo missing)"
done
kube=$(ls -d "$cache"/kube/v*/bin 2>/dev/null | head -n1)
if [[ -x $kube/kube-apiserver ]]; then
	echo "kube-apiserver: $("$kube/kube-apiserver" --version 2>/dev/null | head -n1)"
else
	echo "kube-apiserver: not built"
fi
echo "prometheus: $(prometheus --version 2>&1 | head -n1 || echo missing)"
keda=$(ls -d "$cache"/keda/v*/bin 2>/dev/null | head -n1)
if [[ -x $keda/keda ]]; then
	echo "keda: $(basename "$(dirname "$keda")") (operator + metrics server, built from Go modules)"
else
	echo "keda: not built"
fi
