#!/bin/sh
# Run by stage4-marker.service before its marker (ordered after display-manager.service): stage4 boot
# reads this line and fails when the display manager is not active.
unit=display-manager.service
echo "STAGE4-DISPLAY-MANAGER $(systemctl show -P Id $unit) $(systemctl is-active $unit)" > /dev/ttyS0
