#!/bin/sh
# The display manager as the system's: its unit refuses to start unless it is the default one; the
# graphical target as the default; stage4's boot marker ordered after the display manager, whose state
# /usr/lib/stage4/display-manager.sh reports. One script, not a task per step: each Ansible task costs
# about 0.4 s over the chroot connection.
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
