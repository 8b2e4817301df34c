#!/bin/sh
# Nothing of the build and nothing host-specific stays in the image. One script, not a task per item:
# each Ansible task costs about 0.4 s over the chroot connection.
# $1: the build user to remove ("" when Ansible is logged in as it: stage4 removes it from the host
#     after the poweroff instead); $2: the comment of the build key in root's authorized keys.
set -eu
user=$1 key=$2

if [ -n "$user" ]; then
    if getent passwd "$user" >/dev/null; then
        userdel --force --remove "$user" 2>/dev/null || [ $? -eq 12 ] # 12: no home to remove
    fi
    rm -f "/etc/sudoers.d/$user"
fi
keys=/root/.ssh/authorized_keys
if [ -f "$keys" ] && grep -qF -- "$key" "$keys"; then
    grep -vF -- "$key" "$keys" >"$keys.stage4" || true
    cat "$keys.stage4" >"$keys" # keeps the file's owner and mode
    rm -f "$keys.stage4"
fi

# Every client generates its own host keys and machine id.
rm -f /etc/ssh/ssh_host_*
# Debian's and Ubuntu's ssh.service make no host keys (EL's sshd-keygen units do, and stage4's bootstrap
# bases carry stage4-ssh-host-keys.service): without this drop-in sshd would find none and not start.
if [ -e /lib/systemd/system/ssh.service ] && [ ! -e /etc/systemd/system/stage4-ssh-host-keys.service ]; then
    mkdir -p /etc/systemd/system/ssh.service.d
    printf '%s\n' '[Service]' 'ExecStartPre=' 'ExecStartPre=/usr/bin/ssh-keygen -A' \
        'ExecStartPre=/usr/sbin/sshd -t' > /etc/systemd/system/ssh.service.d/stage4-host-keys.conf
fi
: >/etc/machine-id
chmod 0444 /etc/machine-id
rm -f /var/lib/dbus/machine-id

# stage4's package cache setting, the package caches and indexes, the logs, stage4's build directory.
rm -f /etc/apt/apt.conf.d/00stage4-cache
if command -v apt-get >/dev/null; then
    apt-get clean
    rm -rf /var/lib/apt/lists/*
fi
if command -v dnf >/dev/null; then
    dnf clean all >/dev/null
fi
find /var/log -type f \( -name '*.log' -o -name '*.gz' -o -name '*.[0-9]' -o -name '*.journal' \
    -o -name 'wtmp' -o -name 'btmp' -o -name 'lastlog' \) -delete
rm -rf /var/log/journal/* /var/lib/stage4

# No password login: every password hash (and every empty password) becomes '*'; a locked hash
# ('!...') still carries the hash, so it becomes '!*'.
awk -F: '$2 != "*" && $2 !~ /^!/ { print $1 }' /etc/shadow | while read -r name; do
    usermod -p '*' "$name"
done
awk -F: '$2 ~ /^!./ && $2 != "!*" { print $1 }' /etc/shadow | while read -r name; do
    usermod -p '!*' "$name"
done
