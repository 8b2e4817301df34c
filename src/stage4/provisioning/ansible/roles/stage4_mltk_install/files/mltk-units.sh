#!/bin/sh
# Run by stage4-marker.service before its marker (ordered after each unit named here): the state of each
# unit the mltk modules enabled, as the tests read it from the console log. Through the
# kernel's console, as the marker itself (marker.sh): a getty starting on ttyS0 may flush /dev/ttyS0.
report=
# shellcheck disable=SC2013  # one line of unit names (which have no spaces)
for unit in $(cat /usr/lib/stage4/mltk-units); do
    report="$report $unit=$(systemctl show -P ActiveState "$unit")/$(systemctl show -P Result "$unit")"
done
echo "<2>STAGE4-MLTK-UNITS$report" > /dev/kmsg
