#!/bin/sh
# dnbd3-rootfs, run in stage 4 by the runtime unit stage4-writable.service that stage 3 leaves in /run:
# grows / into /dev/mapper/root when the writable layer is a thin snapshot, which may be larger than the
# file system (ext2/3/4 by resize2fs, xfs by xfs_growfs, both online), then prints one line on the console
# saying what the layer is, as stage 4 sees it:
# "STAGE4-WRITABLE layer=disk|ram device= kind= size= state= fs_bytes= leaves=".
layer=$(cat /run/openslx/writable 2> /dev/null)
grown=""
fstype=$(findmnt -n -o FSTYPE / 2> /dev/null)
dev_bytes=$(blockdev --getsize64 /dev/mapper/root 2> /dev/null || echo 0)
fs_bytes() {
    df -B1 --output=size / 2> /dev/null | tail -n 1 | tr -d ' '
}
before=$(fs_bytes)
case " $layer " in
    # A snapshot is exactly as large as the image's root: nothing to grow, and no grow tool to load
    # over DNBD3 on every boot.
    *" kind=snapshot "*) grown=same ;;
    *)
        case $fstype in
            ext2 | ext3 | ext4) command -v resize2fs > /dev/null && resize2fs /dev/mapper/root > /dev/null 2>&1 && grown=yes ;;
            xfs) command -v xfs_growfs > /dev/null && xfs_growfs / > /dev/null 2>&1 && grown=yes ;;
        esac
        ;;
esac
after=$(fs_bytes)
[ -n "$grown" ] || echo "<4>stage4-writable: / ($fstype) could not be grown to the $dev_bytes bytes of /dev/mapper/root" > /dev/kmsg
# The devices at the bottom of /dev/mapper/root (through the thin pool and its linear pieces).
leaves() (
    for slave in /sys/class/block/"$1"/slaves/*; do
        [ -e "$slave" ] || continue
        name=${slave##*/}
        if [ -n "$(ls /sys/class/block/"$name"/slaves 2> /dev/null)" ]; then
            leaves "$name"
        else
            echo "$name"
        fi
    done
)
root=$(basename "$(readlink -f /dev/mapper/root)")
echo "<2>STAGE4-WRITABLE $layer fs_bytes=$after fs_before=$before leaves=$(leaves "$root" | sort -u | paste -sd, -)" > /dev/kmsg
