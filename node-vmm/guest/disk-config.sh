# shellcheck shell=bash
# The configuration of build-disk.sh's Debian image, written into the root file system
# directory before mkfs. Sourced by build-disk.sh (which defines log and die); part of its
# inputs key.

# Units that cost boot time under TCG, or run maintenance nobody wants in a short-lived VM
# whose base image is read-only (apt's daily download/upgrade, dpkg's database backup,
# e2scrub's online fsck, fstrim, man-db). Masked, so nothing pulls them in.
MASKED_UNITS=(apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer
              e2scrub_reap.service fstrim.timer man-db.timer systemd-tmpfiles-clean.timer)

# configure_rootfs ROOT KERNEL_RELEASE
configure_rootfs() {
    local r=$1 u
    # Root is the whole virtio disk, no partition table; the kernel mounts it rw (cmdline).
    printf '/dev/vda / ext4 defaults,discard 0 1\n' >"$r/etc/fstab"

    # cloud-init: NoCloud (a seed volume labelled cidata) or nothing, never a probe of a
    # cloud's metadata service (slow under TCG, and test traffic stays on the machine).
    cat >"$r/etc/cloud/cloud.cfg.d/90_corescale.cfg" <<'EOF'
# corescale (node-vmm/guest/disk-config.sh): a VM gets its config from a NoCloud seed.
datasource_list: [ NoCloud, None ]
# ext4 on the whole disk, no partition to grow; resizefs grows the file system when the
# VM's overlay is larger than the base image (a no-op otherwise).
growpart:
  mode: "off"
resize_rootfs: true
# The hostname comes from the seed's meta-data (local-hostname), and /etc/hosts names it,
# so sudo and friends resolve it without DNS.
preserve_hostname: false
manage_etc_hosts: true
# C.UTF-8 needs no locale-gen (a few seconds under TCG).
locale: C.UTF-8
# Host keys are made at first boot, never baked into the image. ed25519 + ecdsa: an RSA
# key costs several seconds of a TCG boot.
ssh_deletekeys: true
ssh_genkeytypes: [ed25519, ecdsa]
system_info:
  network:
    renderers: [networkd]
    activators: [networkd]
EOF
    printf 'LANG=C.UTF-8\n' >"$r/etc/default/locale"

    # systemd-networkd applies what cloud-init renders (DHCP on QEMU's user network when the
    # seed has no network-config); systemd-resolved takes the DNS servers from DHCP.
    systemctl -q --root="$r" enable systemd-networkd.service systemd-resolved.service >&2
    ln -sfn ../run/systemd/resolve/stub-resolv.conf "$r/etc/resolv.conf"
    systemctl -q --root="$r" enable serial-getty@ttyS0.service >&2
    for u in "${MASKED_UNITS[@]}"; do
        systemctl -q --root="$r" mask "$u" >&2
    done

    # SSH host keys: openssh-server's postinst made some at install time; each VM must
    # have its own. cloud-init's ssh module makes them (ssh_genkeytypes above); this unit
    # makes them when cloud-init did not (ssh-keygen -A: every missing type).
    rm -f "$r"/etc/ssh/ssh_host_*
    cat >"$r/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=SSH host keys for this VM, when cloud-init made none (corescale)
After=cloud-init.service
Before=ssh.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
RequiredBy=ssh.service
EOF
    systemctl -q --root="$r" enable ssh-hostkeys.service >&2

    # The guest agent answers as soon as its port exists. Debian's unit (started by udev
    # for /dev/virtio-ports/org.qemu.guest_agent.0) has the default dependencies, so it
    # waits for sysinit.target, which waits for cloud-init's network stage: ~20 s later
    # under TCG, and the node onlines hot-plugged vCPUs and reads them through the agent.
    mkdir -p "$r/etc/systemd/system/qemu-guest-agent.service.d"
    cat >"$r/etc/systemd/system/qemu-guest-agent.service.d/corescale-early.conf" <<'EOF'
[Unit]
# corescale: start before sysinit.target (node-vmm/guest/disk-config.sh).
DefaultDependencies=no
After=local-fs.target systemd-journald.socket
Before=shutdown.target
Conflicts=shutdown.target
EOF

    # Each VM its own machine-id (systemd makes one at first boot when the file is empty)
    # and hostname (cloud-init: meta-data local-hostname).
    : >"$r/etc/machine-id"
    rm -f "$r/var/lib/dbus/machine-id"
    printf 'debian\n' >"$r/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"

    # Nothing of the build host or of the build's apt run stays in the image.
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
        "$r"/var/log/apt/* "$r"/var/log/dpkg.log "$r"/var/log/alternatives.log "$r"/tmp/* "$r"/root/.bash_history
}

# check_rootfs ROOT KERNEL_RELEASE: fail the build when the image cannot boot as corescale
# boots it, or would online hot-plugged CPUs by itself.
check_rootfs() {
    local r=$1 kver=$2 list m rules
    # The initramfs must find the root disk: virtio_pci + virtio_blk + ext4, as modules in
    # it or built into the kernel.
    list=$(chroot "$r" lsinitramfs "/boot/initrd.img-$kver") || die "lsinitramfs failed on /boot/initrd.img-$kver"
    for m in virtio_pci virtio_blk ext4; do
        if grep -Eq "/$m\.ko(\.[a-z]+)?\$" <<<"$list"; then continue; fi
        grep -Eq "/$m\.ko(\.[a-z]+)?\$" "$r/lib/modules/$kver/modules.builtin" 2>/dev/null && continue
        die "initrd.img-$kver has no $m module and the kernel has it not built in: the guest could not mount /dev/vda"
    done
    # The node onlines hot-plugged vCPUs through the guest agent (guest-set-vcpus): no udev
    # rule may do it behind its back (Debian ships none; Ubuntu's and RHEL's images do).
    rules=$(grep -lsE 'SUBSYSTEM=="cpu".*online|devices/system/cpu.*online' \
        "$r"/lib/udev/rules.d/* "$r"/etc/udev/rules.d/* "$r"/usr/lib/udev/rules.d/* || true)
    [ -z "$rules" ] || die "udev rules online hot-plugged CPUs by themselves: $rules"
    # The guest agent is started by udev when its virtio-serial port appears.
    grep -qs 'org.qemu.guest_agent.0' "$r/lib/udev/rules.d/60-qemu-guest-agent.rules" \
        || die "qemu-guest-agent's udev rule for the port org.qemu.guest_agent.0 is missing"
    [ -z "$(ls "$r"/etc/ssh/ssh_host_* 2>/dev/null)" ] || die "SSH host keys are left in the image"
    [ ! -s "$r/etc/machine-id" ] || die "/etc/machine-id is not empty"
}
