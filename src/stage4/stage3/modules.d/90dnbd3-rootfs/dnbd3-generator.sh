#!/bin/sh
# systemd generator: on a Stage4 client boot, /sysroot is /dev/mapper/root, mounted read-write (the
# copy-on-write layer takes the writes; no fsck of a snapshot of a cleanly closed image), and the wait
# for it has no time limit: dnbd3root ends the boot itself, with one line, if it cannot make it.
# shellcheck source=/dev/null  # dracut's library, only in the initramfs
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh

getarg slxsrv= > /dev/null || getarg SLX_DNBD3_IMAGE= > /dev/null || exit 0
root=$(getarg root=)
[ -z "$root" ] || [ "$root" = "dnbd3" ] || exit 0

dir=$1
mkdir -p "$dir/initrd-root-fs.target.requires" "$dir/dev-mapper-root.device.d"
cat > "$dir/sysroot.mount" << 'UNIT'
[Unit]
Before=initrd-root-fs.target
[Mount]
Where=/sysroot
What=/dev/mapper/root
Options=rw
UNIT
ln -sf ../sysroot.mount "$dir/initrd-root-fs.target.requires/sysroot.mount"
printf '[Unit]\nJobTimeoutSec=0\nJobRunningTimeoutSec=0\n' > "$dir/dev-mapper-root.device.d/timeout.conf"
exit 0
