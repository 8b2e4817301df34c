#!/bin/sh
# Run by stage4-marker.service before its marker (ordered after each unit named here): the state of each
# unit the mltk modules enabled, as the tests read it from the console log. Through the
# kernel's console, as the marker itself (marker.sh): a getty starting on ttyS0 may flush /dev/ttyS0.
# /dev/kmsg refuses a line longer than about 1000 bytes (EIO, and the marker would never come): a long
# report goes out in several STAGE4-MLTK-UNITS lines. Arguments (tests): the units file, the kmsg file.
units=${1:-/usr/lib/stage4/mltk-units}
kmsg=${2:-/dev/kmsg}
report=
# shellcheck disable=SC2013  # one line of unit names (which have no spaces)
for unit in $(cat "$units"); do
    report="$report $unit=$(systemctl show -P ActiveState "$unit")/$(systemctl show -P Result "$unit")"
    if [ ${#report} -gt 700 ]; then
        echo "<2>STAGE4-MLTK-UNITS$report" >>"$kmsg"
        report=
    fi
done
if [ -n "$report" ]; then echo "<2>STAGE4-MLTK-UNITS$report" >>"$kmsg"; fi
