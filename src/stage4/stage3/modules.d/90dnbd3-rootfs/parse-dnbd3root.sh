#!/bin/sh
# cmdline hook: a Stage4 client boot (slxsrv= or SLX_DNBD3_IMAGE= on the command line) has its root on
# /dev/mapper/root, which /sbin/dnbd3root sets up once udev has settled.
# shellcheck source=/dev/null  # dracut's library, only in the initramfs
command -v getarg > /dev/null || . /lib/dracut-lib.sh

if getarg slxsrv= > /dev/null || getarg SLX_DNBD3_IMAGE= > /dev/null; then
    if [ -z "$root" ] || [ "$root" = "dnbd3" ]; then
        root=block:/dev/mapper/root
        # shellcheck disable=SC2034  # read by dracut, which sources this hook
        rootok=1
        # shellcheck disable=SC2154  # hookdir: set by dracut, which sources this hook
        echo '[ -e /dev/mapper/root ]' > "$hookdir"/initqueue/finished/dnbd3root.sh
        /sbin/initqueue --settled --onetime --unique --name dnbd3root /sbin/dnbd3root
    fi
fi
