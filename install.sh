#!/usr/bin/env bash
# Installs what stage4 needs on Debian 12 (run as root): the host tools from apt and the Python
# environment in ./.venv. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
    mmdebstrap                 # bootstrap builder
    qemu-utils                 # qemu-img: qcow2 create, convert, check
    qemu-system-x86            # boot tests, VM provisioning, accelerator probe
    fdisk gdisk                # sfdisk writes the GPT; sgdisk/sfdisk read it back
    e2fsprogs btrfs-progs xfsprogs dosfstools mtools   # root filesystems and the EFI system partition
    grub-pc-bin grub-efi-amd64-bin grub-common          # GRUB images embedded into the disk
    ovmf                       # UEFI firmware for UEFI boot checks
    cpio zstd                  # initramfs handling
    dracut-core                # lsinitrd: checks the initramfs extracted from the dev layer
    git                        # component and dracut-module sources given as git URL + ref
    openssh-client             # ssh, ssh-keygen: the VM way of provisioning layers
    packer                     # installer-driven bases (Packer 1.6.6 from Debian)
    openssl                    # password hashes for installer build users
    openssh-server rsync       # tests of exports to a remote store (a private sshd on loopback)
    debconf                    # debconf-set-selections checks rendered preseeds
    kmod                       # modinfo: inspect checks each extra module's kernel; depmod: the tests check an index
    binutils                   # as, ld: a test's tiny kernel that prints GRUB-style escape codes
    gcc libc6-dev              # the mltk driver test compiles its fixture module's C program on the host
    busybox                    # stage-3 tests run the client's sh, tar, udhcpc and udhcpd on the host
    cmake make libjansson-dev  # tests build the real dnbd3-server from the cached dnbd3 source
    shellcheck                 # .ci/shellcheck: lints every shipped shell script
    python3-venv               # the Python environment below
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: recommended extras have replaced the host's DNS resolver before.
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "stage4 installed: $(.venv/bin/stage4 --version)"
