"""The base's initramfs: built once per bootstrap, and reused when nothing it is made of changed.

dracut takes most of a bootstrap's time. Its result depends on the kernel, on dracut and its
configuration, and on the files it copies out of the tree. So each built initramfs is kept in the cache
with the list of the paths it holds; a later bootstrap reuses it when the same key comes out of its own
tree: the versions of every package that owns one of those paths or anything where dracut looks for
more (its modules, udev rules, modprobe and systemd configuration, the kernel's modules), and the
content of the unpackaged files among those paths. A new package that puts nothing there (say, `tree`)
reuses the initramfs; one that does (a udev rule, a dracut module, or `less`, which dracut's debug
shell takes in) gets a fresh one.

Runs inside mmdebstrap's customize hook (`python -m stage4.builders.initramfs ROOT CACHE`), where the
chroot has /proc, /sys and /dev mounted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TypedDict

# dracut's own compression (gzip -9, one core) is 90 % of its time; the image is compressed on the host
# instead, with multi-threaded zstd (smaller, and Debian's and Ubuntu's kernels read it). No early
# microcode cpio: the result must be one archive to compress whole. zstd's default level: this
# initramfs boots the image from its own disk only (clients get the dev run's), and on Debian 12's
# 128 MiB cpio level 9 took 1.67 s for 32.8 MB, level 3 0.37 s for 37.3 MB.
DRACUT_ARGS = ("--force", "--no-hostonly", "--no-compress", "--no-early-microcode")
COMPRESS = ("zstd", "-q", "-T0", "-3")
# Where dracut looks for what to include, beyond the files it was asked for by name.
# (systemd units are not here: dracut installs them by name, so they are among the listed contents.)
DRACUT_INPUT_DIRS = (
    "/usr/lib/dracut/",
    "/etc/dracut.conf",
    "/usr/lib/udev/",
    "/etc/udev/",
    "/usr/lib/modprobe.d/",
    "/etc/modprobe.d/",
    "/usr/lib/modules/",
    "/lib/modules/",
)
KEEP_PER_KERNEL = 3
# An `ls -l` line of lsinitrd: mode, links, owner, group, size or "major, minor", date, path.
LISTING_LINE = re.compile(
    r"^[-dlcbps][-rwxsStT]{9}\s+\d+\s+\S+\s+\S+\s+(?:\d+,\s*)?\d+\s+\w{3}\s+\d+\s+"
    r"(?:\d+:\d+|\d{4})\s+(.+)$"
)


class KeyInputs(TypedDict):
    """What an initramfs's cache key is made of (kept beside the cached image)."""

    kernel: str
    dracut: tuple[str, ...]
    packages: dict[str, str]  # package -> version
    unowned: dict[str, str]  # path -> sha256 of its content
    recipe: str  # sha256 of this file


def _installed(root: Path) -> dict[str, str]:
    versions: dict[str, str] = {}
    fields: dict[str, str] = {}
    for line in (root / "var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace").splitlines() + [
        ""
    ]:
        if not line:
            if fields.get("Status") == "install ok installed":
                versions[fields["Package"]] = fields.get("Version", "")
            fields = {}
        elif not line.startswith(" ") and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return versions


def _owned_files(root: Path) -> dict[str, set[str]]:
    """Package -> the files (not directories: every package owns /usr) it installed."""
    owned = {}
    for listing in (root / "var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        paths = set(listing.read_text(encoding="utf-8", errors="replace").split("\n")) - {""}
        owned[package] = {p for p in paths if not _is_directory(root, p)}
    return owned


def _is_directory(root: Path, path: str) -> bool:
    full = root / path.lstrip("/")
    return full.is_dir() and not full.is_symlink()


def _merged_usr(path: str) -> str:
    """dpkg lists /lib/..., the initramfs and merged-/usr trees may say /usr/lib/...; compare both ways."""
    for top in ("/lib/", "/bin/", "/sbin/", "/lib64/"):
        if path.startswith(top):
            return "/usr" + path
    return path


def key_for(root: Path, kernel_version: str, contents: list[str]) -> tuple[str, KeyInputs]:
    """The key of an initramfs with these `contents` (paths inside it), built from this tree, and its
    inputs."""
    wanted = {_merged_usr("/" + path.lstrip("./")) for path in contents}
    wanted = {path for path in wanted if not _is_directory(root, path)}
    versions, owned = _installed(root), _owned_files(root)
    relevant, owned_paths = {}, set()
    for package, files in owned.items():
        normalized = {_merged_usr(f) for f in files}
        owned_paths |= normalized
        if package in versions and (
            normalized & wanted or any(f.startswith(DRACUT_INPUT_DIRS) for f in normalized)
        ):
            relevant[package] = versions[package]
    unowned = {}
    for path in sorted(wanted - owned_paths):
        full = root / path.lstrip("/")
        if full.is_file() and not full.is_symlink():
            unowned[path] = hashlib.sha256(full.read_bytes()).hexdigest()
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    data: KeyInputs = {
        "kernel": kernel_version,
        "dracut": DRACUT_ARGS,
        "packages": relevant,
        "unowned": unowned,
        "recipe": recipe,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest(), data


def _contents(root: Path, image: str) -> list[str]:
    listing = subprocess.run(
        ["chroot", str(root), "lsinitrd", image], check=True, capture_output=True, text=True
    ).stdout
    return [m.group(1).split(" -> ")[0] for m in map(LISTING_LINE.match, listing.splitlines()) if m]


def provide(root: Path, cache: Path, kernel_version: str) -> str:
    """Put /boot/initrd.img-<kernel_version> into the tree, from the cache if possible; say which."""
    target = root / "boot" / f"initrd.img-{kernel_version}"
    entries = cache / kernel_version
    for record in sorted(entries.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        entry = json.loads(record.read_text(encoding="utf-8"))
        cached = record.with_suffix(".img")
        if cached.exists() and key_for(root, kernel_version, entry["contents"])[0] == entry["key"]:
            shutil.copyfile(cached, target)
            os.chmod(target, 0o600)
            os.utime(record)
            return f"reused the initramfs for {kernel_version} from the cache ({entry['key'][:16]})"
    plain = target.with_name(f".{target.name}.cpio")
    subprocess.run(
        ["chroot", str(root), "dracut", "--quiet", *DRACUT_ARGS, f"/boot/{plain.name}", kernel_version],
        check=True,
    )
    contents = _contents(root, f"/boot/{plain.name}")
    subprocess.run([*COMPRESS, "-f", str(plain), "-o", str(target)], check=True)
    plain.unlink()
    os.chmod(target, 0o600)
    key, inputs = key_for(root, kernel_version, contents)
    entries.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(target, entries / f"{key[:16]}.img")
    stored = {"key": key, "contents": contents, "inputs": inputs}
    (entries / f"{key[:16]}.json").write_text(json.dumps(stored, indent=1), encoding="utf-8")
    for old in sorted(entries.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-KEEP_PER_KERNEL]:
        old.unlink()
        old.with_suffix(".img").unlink(missing_ok=True)
    return f"built the initramfs for {kernel_version} once ({key[:16]})"


def main(argv: list[str]) -> int:
    root, cache = Path(argv[0]), Path(argv[1])
    for kernel in sorted((root / "boot").glob("vmlinuz-*")):
        print(f"stage4: {provide(root, cache, kernel.name.removeprefix('vmlinuz-'))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
