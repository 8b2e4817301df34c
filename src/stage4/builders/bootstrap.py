"""The bootstrap builder: mmdebstrap into a directory, no installer, no VM.

The tree gets a kernel, systemd, the initramfs and what Ansible needs later (python3, sudo, sshd);
no compilers, no desktop. The initramfs is built once, at the end: apt-based flows otherwise build it
twice (the kernel's postinst hook, then the dracut trigger), which is most of a plain bootstrap's time;
and when nothing it is made of changed, it is taken from the cache (initramfs.py).
"""

from __future__ import annotations

import os
import shlex
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from stage4.distributions.apt import AptDistribution
from stage4.errors import StepFailed
from stage4.runner import Runner

# Where the real dracut waits while packages install; /usr/bin/dracut missing makes the
# kernel hook and the trigger skip themselves ("[ -x /usr/bin/dracut ] || exit 0").
DRACUT_DIVERT = "/usr/bin/dracut.stage4-deferred"
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*")
DPKG_INCLUDES = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")
# Where they stay in force in the image (for the layers' packages too): the file mmdebstrap's --dpkgopt
# would write.
DPKG_FILTERS = "etc/dpkg/dpkg.cfg.d/99mmdebstrap"
# The chroot's package folder in an mmdebstrap hook (its first argument is the root).
IN_ROOT_ARCHIVES = '"$1"/var/cache/apt/archives'

MARKER_UNIT = """\
[Unit]
Description=stage4: report on the serial console that userspace is up (stage4 VM boots only)
ConditionPathExists=/sys/firmware/qemu_fw_cfg/by_name/opt/org.stage4/marker/raw
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh /usr/lib/stage4/marker.sh

[Install]
WantedBy=multi-user.target
"""

# What / is made of (for `stage4 netboot`: the copy-on-write device over xloop over /dev/dnbd0), read
# from sysfs only, then the marker line, then the poweroff if asked. The lines go out through the kernel's
# console (every stage4 boot has console=ttyS0), not /dev/ttyS0: a getty starting on ttyS0 flushes the
# tty's output queue, and once swallowed the marker that way. Level 2 shows even with `quiet`.
MARKER_SCRIPT = r"""#!/bin/sh
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/org.stage4
src=$(while read -r dev mnt _; do [ "$mnt" = / ] && echo "$dev"; done < /proc/mounts | tail -n 1)
dev=$(basename "$(readlink -f "$src")")
facts="source=$src"
if [ -d "/sys/block/$dev/dm" ]; then
    facts="$facts dm=$(cat "/sys/block/$dev/dm/name") slaves=$(ls "/sys/block/$dev/slaves" | paste -sd, -)"
fi
for file in /sys/block/xloop*/xloop/backing_file; do
    [ -r "$file" ] && facts="$facts $(echo "$file" | cut -d/ -f4)=$(cat "$file")"
done
net=/sys/block/dnbd0/net
[ -r $net/image_name ] \
    && facts="$facts dnbd0=$(cat $net/image_name):$(cat $net/rid)@$(cat $net/cur_server_addr)"
# what stage 3 handed over: its config (sourced, as stage-4 scripts do), a site config.tgz, the boot NIC
[ -r /opt/openslx/config ] \
    && facts="$facts openslx_rid=$(. /opt/openslx/config; echo "${SLX_DNBD3_RID:-unset}")"
[ -r /etc/stage4-site ] && facts="$facts site=$(head -n 1 /etc/stage4-site | tr -cd 'A-Za-z0-9_.-')"
netroot=/run/systemd/network/10-stage4-netroot.network
[ -r $netroot ] && facts="$facts netroot=$(sed -n 's/^MACAddress=//p' $netroot)"
hostkey=/etc/ssh/ssh_host_ed25519_key.pub
[ -r $hostkey ] && facts="$facts ssh_ed25519=$(ssh-keygen -l -f $hostkey | cut -d' ' -f2)"
echo "<2>STAGE4-ROOT $facts" > /dev/kmsg
echo "<2>STAGE4-USERSPACE-UP $(cat $fw/marker/raw)" > /dev/kmsg
test ! -e $fw/poweroff/raw || systemctl poweroff --no-block
"""

FW_CFG_MODULE = "qemu_fw_cfg\n"

NETWORK = """\
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

# Host keys must differ between clients: none in the image, made before sshd first starts. A stage4 VM
# boot offers a set made for it on the build host (machine/ssh_host_keys.py: the RSA key alone takes the
# guest 4-22 s under TCG), taken when the machine has none yet; anything missing is generated here.
SSH_HOST_KEYS_UNIT = """\
[Unit]
Description=stage4: this machine's SSH host keys (the image has none)
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/bin/sh /usr/lib/stage4/ssh-host-keys.sh
"""
SSH_HOST_KEYS_SCRIPT = """#!/bin/sh
set -eu
offered=/sys/firmware/qemu_fw_cfg/by_name/opt/org.stage4/ssh-host-keys/raw
if [ -r $offered ] && ! ls /etc/ssh/ssh_host_*_key > /dev/null 2>&1; then
    tar -x -f $offered -C /etc/ssh
fi
exec /usr/bin/ssh-keygen -A
"""
SSH_SERVICE_DROPIN = """\
[Unit]
Wants=stage4-ssh-host-keys.service
After=stage4-ssh-host-keys.service
"""


@dataclass(frozen=True)
class BootstrapPlan:
    distribution: type[AptDistribution]
    mirror: str | None
    filesystem: str
    identifier: str
    extra_packages: tuple[str, ...]
    hostname: str

    def packages(self) -> list[str]:
        return sorted({*self.distribution.packages(self.filesystem), *self.extra_packages})

    def sources(self) -> list[str]:
        return self.distribution.sources(self.mirror)

    def tree_inputs(self) -> dict[str, object]:
        """What the root file system tree depends on."""
        return {
            "distribution": self.distribution.name,
            "sources": self.sources(),
            "packages": self.packages(),
            "fstab": fstab(self.identifier, self.filesystem),
            "hostname": self.hostname,
        }

    def identity_inputs(self) -> dict[str, object]:
        return {**self.tree_inputs(), "filesystem": self.filesystem, "identifier": self.identifier}


def fstab(identifier: str, filesystem: str) -> str:
    passno = 1 if filesystem == "ext4" else 0
    return f"PARTLABEL={identifier} / {filesystem} defaults 0 {passno}\n"


def stage_files(plan: BootstrapPlan, staging: Path) -> None:
    """The files stage4 adds to the tree, laid out under `staging` and synced into it by mmdebstrap."""
    files = {
        "etc/hostname": f"{plan.hostname}\n",
        "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{plan.hostname}\n::1\tlocalhost ip6-localhost\n",
        "etc/fstab": fstab(plan.identifier, plan.filesystem),
        "etc/systemd/network/80-dhcp.network": NETWORK,
        "etc/systemd/system/stage4-marker.service": MARKER_UNIT,
        "usr/lib/stage4/marker.sh": MARKER_SCRIPT,
        "etc/systemd/system/stage4-ssh-host-keys.service": SSH_HOST_KEYS_UNIT,
        "usr/lib/stage4/ssh-host-keys.sh": SSH_HOST_KEYS_SCRIPT,
        "etc/systemd/system/ssh.service.d/stage4-host-keys.conf": SSH_SERVICE_DROPIN,
        "etc/modules-load.d/stage4-fw-cfg.conf": FW_CFG_MODULE,
    }
    for relative, content in files.items():
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


def customize_script(initramfs_cache: Path) -> str:
    return textwrap.dedent(f"""\
        set -eu
        root="$1"
        chroot "$root" dpkg-divert --quiet --local --rename --remove --divert {DRACUT_DIVERT} /usr/bin/dracut
        chroot "$root" systemctl enable --quiet systemd-networkd.service stage4-marker.service
        chroot "$root" systemctl mask --quiet systemd-networkd-wait-online.service
        rm -f "$root"/etc/ssh/ssh_host_*
        : > "$root/etc/machine-id"
        # mmdebstrap copied the build host's resolv.conf in: systemd-resolved's symlink stays (its package
        # kept the host's copy as a backup), anything else becomes an empty file. Its apt options were the
        # build's.
        rm -f "$root/etc/.resolv.conf.systemd-resolved.bak"
        if [ ! -L "$root/etc/resolv.conf" ]; then
            rm -f "$root/etc/resolv.conf"
            install -m 0644 /dev/null "$root/etc/resolv.conf"
        fi
        rm -f "$root/etc/apt/apt.conf.d/99mmdebstrap" "$root/usr/sbin/policy-rc.d"
        {shlex.quote(sys.executable)} -m stage4.builders.initramfs "$root" {shlex.quote(str(initramfs_cache))}
        """)


def extract_script() -> str:
    """Run on the tree (as $1) right after mmdebstrap extracted the essential packages: dpkg's path filters,
    which every later unpack applies (the essential packages are unpacked once more by dpkg), and what
    they leave out removed from the extraction. Given as --dpkgopt instead, the filters would make
    mmdebstrap pipe every essential package through its Python tar filter: 10-11 s instead of 5."""
    lines = ["set -eu", f"cat > \"$1\"/{DPKG_FILTERS} <<'FILTERS'"]
    lines += [f"path-exclude={pattern}" for pattern in DPKG_EXCLUDES]
    lines += [f"path-include={pattern}" for pattern in DPKG_INCLUDES]
    lines.append("FILTERS")
    for pattern in DPKG_EXCLUDES:  # each "/folder/*"; dpkg's * also matches "/", as find's -path does
        folder = '"$1"' + shlex.quote(pattern.removesuffix("/*"))
        kept = "".join(
            f' ! -path "$1"{shlex.quote(include)}'
            for include in DPKG_INCLUDES
            if include.startswith(pattern[:-1])
        )
        lines.append(
            f"if [ -d {folder} ]; then find {folder} -mindepth 1 ! -type d{kept} -delete; "
            f"find {folder} -mindepth 1 -depth -type d -empty -delete; fi"
        )
    return "\n".join(lines) + "\n"


def essential_script() -> str:
    return (
        f'chroot "$1" dpkg-divert --quiet --local --rename --add --divert {DRACUT_DIVERT} /usr/bin/dracut\n'
    )


def run_mmdebstrap(plan: BootstrapPlan, rootfs: Path, work: Path, cache_dir: Path, runner: Runner) -> None:
    """Bootstrap into `rootfs`; downloaded packages and built initramfs images are kept in `cache_dir`."""
    staging = work / "staging"
    stage_files(plan, staging)
    extract, essential, customize = work / "extract.sh", work / "essential.sh", work / "customize.sh"
    extract.write_text(extract_script(), encoding="utf-8")
    essential.write_text(essential_script(), encoding="utf-8")
    customize.write_text(customize_script(cache_dir / "initramfs"), encoding="utf-8")
    apt_cache = cache_dir / "apt" / plan.distribution.name
    apt_cache.mkdir(parents=True, exist_ok=True)
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        f"--include={','.join(plan.packages())}",
        *([f"--keyring={plan.distribution.keyring}"] if plan.distribution.keyring else []),
        '--aptopt=Acquire::Retries "3"',
        # Keep downloaded packages between builds: a rebuild with one more package downloads one package.
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook={link_debs(shlex.quote(str(apt_cache)), IN_ROOT_ARCHIVES)}",
        f'--extract-hook=sh {extract} "$1"',
        f'--essential-hook=sh {essential} "$1"',
        f"--customize-hook=sync-in {staging} /",
        f'--customize-hook=sh {customize} "$1"',
        f"--customize-hook={link_debs(IN_ROOT_ARCHIVES, shlex.quote(str(apt_cache)))}",
        plan.distribution.codename,
        str(rootfs),
        *plan.sources(),
    ]
    with runner.recording(work):  # for the cleanup after a killed build (stage4/workdirs.py)
        runner.run(argv, step="bootstrap (mmdebstrap)", env={"LC_ALL": "C.UTF-8"})
    settle_apt_dirs(rootfs)


def link_debs(source: str, target: str) -> str:
    """A hook's shell command: the packages of the folder `source` hard-linked into `target` (both shell
    words), keeping those `target` has.
    mmdebstrap's sync-in and sync-out copy the whole cache (hundreds of MB: 12 s of a 42 s bootstrap);
    links cost nothing, and apt only ever adds or deletes a package file, never rewrites one. Copies where
    the two are on different filesystems. No lock file: apt locks by inode, and builds share the cache."""
    found = f"find {source} -maxdepth 1 -name '*.deb' -exec cp -n"
    return f"{found} --link -t {target} {{}} + 2>/dev/null || {found} -t {target} {{}} +"


def settle_apt_dirs(rootfs: Path) -> None:
    """apt's (empty) download folder for package lists belongs to _apt or to root depending on which apt
    run touched it last (a bootstrap with a cold package cache left _apt, a warm one root); the same
    owner whichever way the tree was made: _apt, as apt itself sets it."""
    partial = rootfs / "var/lib/apt/lists/partial"
    passwd = rootfs / "etc/passwd"
    if not partial.is_dir() or not passwd.is_file():
        return
    for line in passwd.read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[0] == "_apt":
            os.chown(partial, int(fields[2]), 0)
            partial.chmod(0o700)


# Apt as mmdebstrap runs it (its 00mmdebstrap and our --aptopt), for the update of a kept tree.
UPDATE_APT_OPTIONS = (
    "-o", "Apt::Install-Recommends=false",
    "-o", "Acquire::Languages=none",
    "-o", "Acquire::Retries=3",
    *(part for pattern in DPKG_EXCLUDES for part in ("-o", f"DPkg::Options::=--path-exclude={pattern}")),
    *(part for pattern in DPKG_INCLUDES for part in ("-o", f"DPkg::Options::=--path-include={pattern}")),
)  # fmt: skip
STALE = 75  # the update script's exit status when the mirror moved on since the kept tree was made
# What mmdebstrap's cleanup/reproducible step removes (logs of this build, nothing of the system).
BUILD_LOGS = (
    "/var/log/dpkg.log",
    "/var/log/apt/history.log",
    "/var/log/apt/term.log",
    "/var/log/alternatives.log",
    "/var/cache/ldconfig/aux-cache",
    "/var/log/apt/eipp.log.xz",
    "/var/lib/dbus/machine-id",
)


def tree_key_inputs(plan: BootstrapPlan) -> dict[str, object]:
    """What a kept root tree depends on apart from its package list: a tree with the same key and another
    package list is brought to the new list by installing and purging the difference."""
    return {key: value for key, value in plan.tree_inputs().items() if key != "packages"}


def update_script(added: list[str], removed: list[str]) -> str:
    """Run with the tree as $1 (/proc, /sys, /dev and the package cache mounted): install `added`, let
    `removed` go with what only they pulled in, leave no trace of the build host, as mmdebstrap does."""
    options = " ".join(shlex.quote(option) for option in UPDATE_APT_OPTIONS)
    return textwrap.dedent(f"""\
        set -eu
        root="$1"
        export DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true
        in_root() {{ chroot "$root" "$@"; }}
        apt() {{ in_root apt-get -y -q {options} "$@"; }}
        mv "$root/etc/resolv.conf" "$root/etc/resolv.conf.stage4-kept"
        cat /etc/resolv.conf > "$root/etc/resolv.conf"
        printf '#!/bin/sh\\nexit 101\\n' > "$root/usr/sbin/policy-rc.d"
        chmod 0755 "$root/usr/sbin/policy-rc.d"
        in_root dpkg-divert --quiet --local --rename --add --divert {DRACUT_DIVERT} /usr/bin/dracut
        apt update
        # The mirror moved on since the tree was made (a new kernel, a security update): a fresh bootstrap
        # would hold the new versions only; an upgrade of the kept tree could keep old ones (an old kernel
        # beside the new). Give up; the caller bootstraps from scratch.
        if in_root apt-get -s -q {options} upgrade | grep -q '^Inst '; then exit {STALE}; fi
        {"in_root apt-mark auto " + " ".join(map(shlex.quote, removed)) if removed else ":"}
        {"apt install " + " ".join(map(shlex.quote, added)) if added else ":"}
        apt autoremove --purge
        apt -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/dev/null update
        umount "$root/var/cache/apt/archives"
        in_root apt-get clean
        rm -rf "$root/var/lib/apt/lists/auxfiles"
        for log in {" ".join(BUILD_LOGS)}; do rm -f "$root$log"; done
        rm -f "$root/etc/resolv.conf" "$root/usr/sbin/policy-rc.d"
        mv "$root/etc/resolv.conf.stage4-kept" "$root/etc/resolv.conf"
        """)


def package_difference(wanted: list[str], previous: list[str]) -> tuple[list[str], list[str]]:
    """The packages to add and to remove to bring a tree of `previous` to `wanted`."""
    return sorted(set(wanted) - set(previous)), sorted(set(previous) - set(wanted))


def update_tree(
    plan: BootstrapPlan,
    rootfs: Path,
    work: Path,
    cache_dir: Path,
    runner: Runner,
    previous: list[str],
) -> bool:
    """Bring the kept tree of an earlier bootstrap (same key, package list `previous`) in `rootfs` to this
    plan: the package difference, then the same files and customize script as a bootstrap from scratch.
    False if the mirror has newer versions of the tree's packages (then the tree is no base for this
    build: bootstrap from scratch)."""
    added, removed = package_difference(plan.packages(), previous)
    staging = work / "staging"
    stage_files(plan, staging)
    script, customize = work / "update.sh", work / "customize.sh"
    script.write_text(update_script(added, removed), encoding="utf-8")
    customize.write_text(customize_script(cache_dir / "initramfs"), encoding="utf-8")
    apt_cache = cache_dir / "apt" / plan.distribution.name
    apt_cache.mkdir(parents=True, exist_ok=True)
    mounts = (
        (["-t", "proc", "proc"], "proc"),
        (["-t", "sysfs", "sysfs"], "sys"),
        (["--bind", "/dev"], "dev"),
        (["--bind", str(apt_cache)], "var/cache/apt/archives"),
    )
    env = {"LC_ALL": "C.UTF-8"}
    with runner.recording(work):  # for the cleanup after a killed build (stage4/workdirs.py)
        mounted: list[Path] = []
        try:
            for args, relative in mounts:
                target = rootfs / relative
                target.mkdir(parents=True, exist_ok=True)
                runner.note("mount", target=str(target.resolve()))
                runner.run(["mount", *args, str(target)], step="update the kept tree (mount)")
                mounted.append(target)
            done = runner.run(
                ["sh", str(script), str(rootfs)], step="update the kept tree (apt)", env=env, check=False
            )
            if done.returncode == STALE:
                return False
            if done.returncode != 0:
                raise StepFailed(
                    "update the kept tree (apt)", f"exit status {done.returncode}", runner.log_path
                )
            mounted.remove(rootfs / "var/cache/apt/archives")  # the script unmounted it before apt-get clean
            runner.run(["cp", "-a", f"{staging}/.", f"{rootfs}/"], step="update the kept tree (files)")
            runner.run(["sh", str(customize), str(rootfs)], step="update the kept tree (customize)", env=env)
        finally:
            for target in reversed(mounted):
                runner.run(
                    ["umount", "--lazy", str(target)], step="update the kept tree (unmount)", check=False
                )
    settle_apt_dirs(rootfs)
    return True


def kernel_versions(rootfs: Path) -> list[str]:
    return sorted(path.name.removeprefix("vmlinuz-") for path in (rootfs / "boot").glob("vmlinuz-*"))


def installed_packages(rootfs: Path, runner: Runner) -> dict[str, str]:
    result = runner.run(
        [
            "dpkg-query",
            f"--admindir={rootfs / 'var/lib/dpkg'}",
            "-W",
            "-f=${Package}\\t${Version}\\t${db:Status-Abbrev}\\n",
        ],
        step="package list",
        capture=True,
    )
    packages = {}
    for line in result.stdout.splitlines():
        name, version, status = line.split("\t")
        if status[1:2] == "i":  # installed, whether wanted ('ii') or held ('hi')
            packages[name] = version
    return packages


def check_mirror_reachable(plan: BootstrapPlan) -> str | None:
    """None if the release file can be fetched, else the reason it cannot."""
    import urllib.error
    import urllib.request

    url = plan.distribution.release_file_url(plan.mirror)
    if url.startswith("file://"):
        return None if os.path.exists(url.removeprefix("file://")) else f"{url} does not exist"
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            response.read(64)
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"
