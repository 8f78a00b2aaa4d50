# shellcheck shell=bash
# Helpers shared by build.sh (the initramfs test guest) and build-disk.sh (the Debian disk
# image). Sourced, never run; the caller defines die() (print an error and exit).

# extract_pvh_vmlinux BZIMAGE OUT: write the uncompressed ELF kernel inside an x86 bzImage
# to OUT and check that it has the PVH entry note, so QEMU's `-kernel OUT` boots it through
# PVH without the in-guest decompression (slow under TCG).
extract_pvh_vmlinux() {
    local bz=$1 out=$2 setup_sects payload_off payload_len start magic want_size got_size
    [ -f "$bz" ] || die "kernel image $bz not found"
    rd_u() { od -An -t "u$2" -j "$1" -N "$2" "$bz" | tr -d ' \n'; }
    [ "$(od -An -c -j 514 -N 4 "$bz" | tr -d ' \n')" = HdrS ] || die "$bz is not a bzImage (no HdrS header)"
    setup_sects=$(rd_u 497 1)               # 0x1f1
    [ "$setup_sects" -ne 0 ] || setup_sects=4
    payload_off=$(rd_u 584 4)               # 0x248, relative to the protected-mode code
    payload_len=$(rd_u 588 4)               # 0x24c
    start=$(( (setup_sects + 1) * 512 + payload_off ))
    magic=$(od -An -tx1 -j "$start" -N 6 "$bz" | tr -d ' \n')
    payload() { dd if="$bz" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$payload_len" status=none; }
    case $magic in
        fd377a585a00) payload | xz -dc --single-stream >"$out" ;;
        1f8b*)        payload | gzip -dc >"$out" 2>/dev/null || [ -s "$out" ] ;;
        28b52ffd*)    command -v zstd >/dev/null || die "kernel payload is zstd: install zstd"
                      payload | zstd -dc >"$out" ;;
        5d0000*)      payload | xz -dc --format=lzma >"$out" 2>/dev/null || [ -s "$out" ] ;;
        *) die "unknown kernel payload compression (magic $magic) in $bz" ;;
    esac
    [ "$(od -An -tx1 -N4 "$out" | tr -d ' \n')" = 7f454c46 ] || die "decompressed kernel is not an ELF file"
    # mkpiggy appends the decompressed size as the payload's last 4 bytes (little endian).
    want_size=$(od -An -tu4 -j "$((start + payload_len - 4))" -N 4 "$bz" | tr -d ' \n')
    got_size=$(stat -c %s "$out")
    [ "$want_size" = "$got_size" ] || die "decompressed kernel is $got_size bytes, the bzImage says $want_size"
    # The PVH entry point is ELF note "Xen" type 18 (XEN_ELFNOTE_PHYS32_ENTRY): QEMU needs it for -kernel vmlinux.
    readelf -n "$out" | grep -Eq 'Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*\(0x00000012\)' \
        || die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); the kernel needs CONFIG_PVH=y"
}
