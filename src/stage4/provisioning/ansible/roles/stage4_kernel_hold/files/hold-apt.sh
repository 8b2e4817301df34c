#!/bin/sh
# hold-apt.sh KVER: hold the package of the kernel KVER and the meta packages that pull it in
# (linux-image-amd64, ...).
set -eu
owner=$(dpkg-query -S "/boot/vmlinuz-$1" | cut -d: -f1)
dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Depends}\n' 'linux-image-*' |
    awk -v owner="$owner" '$1 == "ii" && ($2 == owner || index($0, owner)) { print $2 }' |
    xargs --no-run-if-empty apt-mark hold
