#!/bin/sh
# Replace every password hash (and every empty password) in /etc/shadow by '*': no password login.
set -eu
awk -F: '$2 != "*" && $2 !~ /^!/ { print $1 }' /etc/shadow | while read -r user; do
    usermod -p '*' "$user"
done
# A locked hash ('!...') still carries the hash; drop it as well.
awk -F: '$2 ~ /^!./ && $2 != "!*" { print $1 }' /etc/shadow | while read -r user; do
    usermod -p '!*' "$user"
done
