#!/bin/sh
# Run by stage4-marker.service before its marker (ordered after display-manager.service): stage4 boot
# reads this line and fails when the display manager is not active. Through the kernel's console, as the
# marker itself (marker.sh): a getty starting on ttyS0 may flush what is written to /dev/ttyS0.
unit=display-manager.service
echo "<2>STAGE4-DISPLAY-MANAGER $(systemctl show -P Id $unit) $(systemctl is-active $unit)" > /dev/kmsg
