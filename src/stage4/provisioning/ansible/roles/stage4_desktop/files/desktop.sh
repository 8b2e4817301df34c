#!/bin/sh
# The display manager as the system's: its unit refuses to start unless it is the default one; the
# graphical target as the default; stage4's boot marker ordered after the display manager, whose state
# /usr/lib/stage4/display-manager.sh (written here) reports. One script, not a task per step: a script
# starts no Python in the layer, while each copy, file or command task costs about 0.3 s in a chroot.
# $1: the display manager's program (/usr/sbin/lightdm); $2: its unit's name (lightdm).
set -eu
daemon=$1 unit=$2
mkdir -p /etc/X11 /usr/lib/stage4 /etc/systemd/system/stage4-marker.service.d
printf '%s\n' "$daemon" >/etc/X11/default-display-manager
chmod 0644 /etc/X11/default-display-manager
systemctl enable --force "$unit.service"
systemctl set-default graphical.target
cat >/etc/systemd/system/stage4-marker.service.d/stage4-desktop.conf <<'CONF'
[Unit]
After=display-manager.service

[Service]
ExecStartPre=/bin/sh /usr/lib/stage4/display-manager.sh
CONF
# Run by stage4-marker.service before its marker: stage4 boot reads this line and fails when the display
# manager is not active. Through the kernel's console, as the marker itself (marker.sh): a getty starting
# on ttyS0 may flush what is written to /dev/ttyS0.
cat >/usr/lib/stage4/display-manager.sh <<'REPORT'
#!/bin/sh
unit=display-manager.service
echo "<2>STAGE4-DISPLAY-MANAGER $(systemctl show -P Id $unit) $(systemctl is-active $unit)" > /dev/kmsg
REPORT
chmod 0755 /usr/lib/stage4/display-manager.sh
