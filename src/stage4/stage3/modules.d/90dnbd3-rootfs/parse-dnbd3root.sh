#!/bin/sh
# cmdline hook: a Stage4 client boot (slxsrv= or SLX_DNBD3_IMAGE= on the command line) has its root on
# /dev/mapper/root, which /sbin/dnbd3root sets up once udev has settled.
command -v getarg > /dev/null || . /lib/dracut-lib.sh

if getarg slxsrv= > /dev/null || getarg SLX_DNBD3_IMAGE= > /dev/null; then
    if [ -z "$root" ] || [ "$root" = "dnbd3" ]; then
        root=block:/dev/mapper/root
        rootok=1
        echo '[ -e /dev/mapper/root ]' > "$hookdir"/initqueue/finished/dnbd3root.sh
        /sbin/initqueue --settled --onetime --unique --name dnbd3root /sbin/dnbd3root
    fi
fi
