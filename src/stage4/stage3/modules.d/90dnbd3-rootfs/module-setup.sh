#!/bin/bash
# dnbd3-rootfs: the root file system of a Stage4 client from a DNBD3 server (docs/client-boot.md).
# Network by DHCP (busybox udhcpc), config over HTTP (bash), /dev/dnbd0 (dnbd3-client),
# xloop (QCOW, read-only, partition scan), /dev/mapper/root: a thin snapshot on a local partition or a
# device-mapper snapshot in RAM (stage4-writable.sh); before the switch to it, /opt/openslx/config and
# the site's config.tgz in the new root.

# stage4 installs the dnbd3 and xloop tools to /usr/local/sbin, which dracut's PATH may lack.
case ":$PATH:" in *:/usr/local/sbin:*) ;; *) PATH="$PATH:/usr/local/sbin" ;; esac

check() {
    require_binaries dnbd3-client xlosetup dmsetup busybox blkid || return 1
    return 255  # only when asked for (dracut --add dnbd3-rootfs)
}

depends() {
    echo bash dm
}

installkernel() {
    instmods dnbd3 xloop xloop_file_fmt_qcow xloop_file_fmt_raw dm-snapshot dm-thin-pool zram
    # The local disk of the writable layer.
    hostonly='' instmods virtio_blk virtio_scsi sd_mod ahci nvme
    # Any wired NIC a lab PC or a VM may have.
    hostonly='' instmods '=drivers/net/ethernet' virtio_net e1000 e1000e r8169 igb
}

# shellcheck disable=SC2154  # moddir, initdir, systemdutildir: set by dracut, which sources this file
install() {
    inst_multiple dnbd3-client xlosetup dmsetup busybox blkid ip timeout head tail od tr sort seq grep sed cat \
        sleep dmesg modprobe udevadm mkdir mv rm chmod dd cksum cut cp ln
    inst_libdir_file 'libnss_dns*' 'libnss_files*'
    inst_simple "$moddir/stage4-lib.sh" /lib/stage4-lib.sh
    inst_simple "$moddir/stage4-net.sh" /lib/stage4-net.sh
    inst_simple "$moddir/stage4-writable.sh" /lib/stage4-writable.sh
    inst_simple "$moddir/stage4-writable-stage4.sh" /lib/stage4-writable-stage4.sh
    inst_simple "$moddir/stage4-writable-watch.sh" /lib/stage4-writable-watch.sh
    inst_script "$moddir/stage4-handover.sh" /sbin/stage4-handover
    inst_hook pre-pivot 50 "$moddir/stage4-pre-pivot.sh"
    inst_script "$moddir/dnbd3root.sh" /sbin/dnbd3root
    inst_script "$moddir/udhcpc-script.sh" /lib/stage4-udhcpc.sh
    inst_hook cmdline 90 "$moddir/parse-dnbd3root.sh"
    inst_script "$moddir/dnbd3-generator.sh" "$systemdutildir"/system-generators/dracut-dnbd3-generator
    # No emergency shell unless the command line says rd.shell (the kernel's words come after these).
    mkdir -p "$initdir/etc/cmdline.d"
    printf 'rd.shell=0\n' > "$initdir/etc/cmdline.d/90dnbd3-rootfs.conf"
    dracut_need_initqueue
}
