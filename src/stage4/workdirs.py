"""Work directories in the cache: who owns them, what a build attached in them, and the cleanup of what a
killed build left behind.

A build records every attachment in the directory it works in, as it happens (stage4/attachments.py).
While an image is built, its owner record (`<image>.owner.json` beside the work directories: PID, start
time, boot, output folder) exists and the image's build lock (`<image>.lock`) is held; an orderly end,
also by Ctrl-C or SIGTERM, removes the owner record, so the work directory of an interrupted base stays
for the rerun to continue from.

An owner is gone when its PID is absent, belongs to a later process (another start time) or to an earlier
boot. A SIGKILLed build (an OOM kill) leaves its owner record and open scopes: its work directories are
stale. The next build of the image, before it decides what to reuse, and `stage4 clean` end the processes
(by recorded PID and process group, and any process whose root, working directory or open files are in
the directory), unmount what is mounted below it (newest first, the FUSE exports last), detach its loop
devices and remove it, with the dead build's partial files in the output folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage4.attachments import Owner, Record, open_scopes, process_start, read_records
from stage4.fsutil import exclusive_lock, remove_tree, write_json_atomically

if TYPE_CHECKING:
    from stage4.runner import Runner

KILL_WAIT_SECONDS = 15
# Work directory names (builders/base_image.py, layers/layer_steps.py): <image>-<16 hex> for a base (rootfs or
# Packer identity), <image>-layers-<12 hex> for the dev and prod layers.
_WORK_DIR = re.compile(r"^(?P<image>.+)-(?:layers-[0-9a-f]{12}|[0-9a-f]{16})$")
# Partial files of temporary_sibling and the layers' artifact swap: .<name>.partial-<pid>, .<name>.old-<pid>.
_PARTIAL = re.compile(r"^\..+\.(?:partial|old)-(?P<pid>[0-9]+)$")
# The caches kept between builds (`stage4 clean --cache`): shared by all images, and the bases' kept root
# trees (one per image, builders/base_image.py).
SHARED_CACHES = ("apt", "initramfs", "probe", "packer", "accelerator.json", "trees")


# --- the image's owner record and build lock ------------------------------------------------------------


def owner_record(cache_dir: Path, image: str) -> Path:
    return cache_dir / "work" / f"{image}.owner.json"


def lock_file(cache_dir: Path, image: str) -> Path:
    return cache_dir / "work" / f"{image}.lock"


@contextlib.contextmanager
def image_build(cache_dir: Path, image: str, output_dir: Path, runner: Runner) -> Iterator[list[Freed]]:
    """Hold the image's build lock for its whole build; first release what a killed build of it left.

    Yields what was freed. The owner record says who builds the image; it is removed on every orderly exit.
    """
    display = runner.display
    with exclusive_lock(
        lock_file(cache_dir, image), lambda: display.info(f"{image}: waiting for another build of it")
    ):
        freed = recover(cache_dir, image, runner)
        for item in freed:
            display.info(
                f"{image}: released what a killed build left: {item.path} ({readable_size(item.bytes)})"
            )
        record = owner_record(cache_dir, image)
        write_json_atomically(
            record, {**Owner.me().to_record(), "image": image, "output_dir": str(output_dir.absolute())}
        )
        try:
            yield freed
        finally:
            record.unlink(missing_ok=True)


@contextlib.contextmanager
def try_image_lock(cache_dir: Path, image: str) -> Iterator[bool]:
    """The image's build lock if no build holds it (True), else False at once."""
    path = lock_file(cache_dir, image)
    if not path.parent.is_dir():
        yield True  # no work folder: nothing to clean, nothing to lock
        return
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _dead_owner(cache_dir: Path, image: str) -> dict[str, Any] | None:
    """The owner record of the image's last build if that build was killed (it never removed it)."""
    try:
        # Free-form JSON read back from disk (written by image_build; a killed build may have left anything).
        data: dict[str, Any] = json.loads(owner_record(cache_dir, image).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    owner = Owner.from_record(data)
    return None if owner is not None and owner.alive() else data


# --- cleanup ----------------------------------------------------------------------------------------------


@dataclass
class Freed:
    path: Path
    state: str  # KILLED, RESUMABLE or LEFT_OVER
    bytes: int


@dataclass
class CleanReport:
    freed: list[Freed] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # images a live build holds

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.freed)


KILLED = "left by a killed build"
RESUMABLE = "kept to resume an interrupted build"
LEFT_OVER = "left over, no build uses it"


def work_dirs(cache_dir: Path, image: str | None = None) -> dict[str, list[Path]]:
    """The work directories in the cache by image (all images, or only `image`)."""
    found: dict[str, list[Path]] = {}
    root = cache_dir / "work"
    if not root.is_dir():
        return found
    for entry in sorted(root.iterdir()):
        match = _WORK_DIR.match(entry.name)
        if match and entry.is_dir() and (image is None or match["image"] == image):
            found.setdefault(match["image"], []).append(entry)
    for entry in root.glob("*.owner.json"):
        name = entry.name.removesuffix(".owner.json")
        if image is None or name == image:
            found.setdefault(name, [])
    return found


def recover(cache_dir: Path, image: str, runner: Runner) -> list[Freed]:
    """Release and remove what a killed build of `image` left; the caller holds the image's build lock."""
    dead = _dead_owner(cache_dir, image)
    freed = []
    for work in work_dirs(cache_dir, image).get(image, []):
        records = read_records(work)
        owners = open_scopes(records)
        if any(owner.alive() for owner in owners):
            continue  # attached by a live process: never another build's cleanup
        if dead is not None or owners:
            freed.append(release(work, records, runner, KILLED))
    if dead is not None:
        freed += _remove_partials(Path(dead.get("output_dir", "")) / image, int(dead.get("pid", 0)))
        owner_record(cache_dir, image).unlink(missing_ok=True)
    return freed


def clean(
    cache_dir: Path, images: list[str] | None, runner: Runner, shared_caches: bool = False
) -> CleanReport:
    """Remove the work directories of images no live build holds: those of killed builds (after releasing
    what they attached) and those kept to resume an interrupted build; with `shared_caches` also the
    caches kept between builds. Images being built are reported as busy and left alone."""
    report = CleanReport()
    for image in images or sorted(work_dirs(cache_dir)):
        with try_image_lock(cache_dir, image) as locked:
            if not locked:
                report.busy.append(image)
                continue
            report.freed += recover(cache_dir, image, runner)
            for work in work_dirs(cache_dir, image).get(image, []):
                records = read_records(work)
                if any(owner.alive() for owner in open_scopes(records)):
                    report.busy.append(image)
                else:
                    resumable = any(work.glob("*.done"))  # the base builders' step stamps
                    report.freed.append(release(work, records, runner, RESUMABLE if resumable else LEFT_OVER))
    if shared_caches:
        for name in SHARED_CACHES:
            path = cache_dir / name
            if path.exists():
                size = allocated_bytes(path)
                remove_tree(path)
                report.freed.append(Freed(path, "cache kept between builds", size))
    return report


def release(work: Path, records: list[Record], runner: Runner, state: str) -> Freed:
    """End the processes of `work`, unmount and detach what is attached below it, and remove it."""
    work = work.resolve()
    end_processes(work, records)
    mounts = mounts_in_order(work)
    step = f"release {work.name}"
    # The loop devices mounted here: once qemu-storage-daemon is gone (stage4's death ends it), a loop's
    # backing file no longer names the work directory.
    devices = loop_devices(work, records) | {
        source for _, _, source in mounts if source.startswith("/dev/loop")
    }
    for target, fs_type, _ in mounts:
        if not fs_type.startswith("fuse"):
            _unmount(target, runner, step)
    for device in sorted(devices):
        runner.run(["losetup", "--detach", device], step=step, check=False)
    for target, fs_type, _ in mounts:
        if fs_type.startswith("fuse"):
            _unmount(target, runner, step)
    size = allocated_bytes(work)
    remove_tree(work)
    return Freed(work, state, size)


def _unmount(target: str, runner: Runner, step: str) -> None:
    if runner.run(["umount", target], step=step, check=False).returncode != 0:
        runner.run(["umount", "--lazy", target], step=step, check=False)


def end_processes(work: Path, records: list[Record]) -> list[int]:
    """SIGKILL every process of `work` and wait until they are gone; returns their PIDs.

    Recorded processes count if their start time still matches, with the members of their process groups
    (stage4 starts each command in its own group); any process whose root (a chroot), working directory or
    open files are below `work` counts too.
    """
    groups: set[int] = set()
    for record in records:
        pid = record.get("pid")
        if record.get("what") == "process" and isinstance(pid, int) and record.get("start") is not None:
            leader = Owner.of(pid)
            if leader is None or leader.start == record["start"]:
                groups.add(pid)  # the group is ours unless its leader's PID now names a later process
    me = os.getpid()
    victims = [pid for pid in _pids() if pid != me and (_group(pid) in groups or _uses(pid, work))]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    starts = {pid: process_start(pid) for pid in victims}
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while time.monotonic() < deadline and any(
        process_start(p) == s and s is not None for p, s in starts.items()
    ):
        time.sleep(0.1)
    return victims


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _group(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[2])


def _uses(pid: int, work: Path) -> bool:
    prefix = str(work) + "/"
    links = [f"/proc/{pid}/root", f"/proc/{pid}/cwd"]
    with contextlib.suppress(OSError):
        links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    for link in links:
        with contextlib.suppress(OSError):
            target = os.readlink(link)
            if target == str(work) or target.startswith(prefix):
                return True
    return False


def mounts_in_order(work: Path) -> list[tuple[str, str, str]]:
    """(mount point, file system type, source) at or below `work`, the newest mount first."""
    prefix = str(work) + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            target = fields[4].replace("\\040", " ")
            fs_type, source = fields[fields.index("-") + 1 : fields.index("-") + 3]
            if target == str(work) or target.startswith(prefix):
                found.append((target, fs_type, source))
    return found[::-1]


def loop_devices(work: Path, records: list[Record]) -> set[str]:
    """Loop devices whose backing file is below `work` (recorded or not: a kill can come before the record),
    and recorded ones whose backing file lost its name (its FUSE export is gone) with the recorded
    geometry."""
    prefix = str(work) + "/"
    recorded = {
        r["device"]: r for r in records if r.get("what") == "loop" and isinstance(r.get("device"), str)
    }
    attached = set()
    for sys_dir in Path("/sys/block").glob("loop*"):
        device = f"/dev/{sys_dir.name}"
        with contextlib.suppress(OSError, ValueError):
            backing = (sys_dir / "loop/backing_file").read_text().strip().removesuffix(" (deleted)")
            record = recorded.get(device)
            if (
                backing.startswith(prefix)
                or record is not None
                and backing == "/"
                and int((sys_dir / "loop/offset").read_text()) == record.get("offset")
                and int((sys_dir / "loop/sizelimit").read_text()) == record.get("sizelimit")
            ):
                attached.add(device)
    return attached


def _remove_partials(image_dir: Path, pid: int) -> list[Freed]:
    freed = []
    if pid and image_dir.is_dir():
        for entry in image_dir.iterdir():
            match = _PARTIAL.match(entry.name)
            if match and int(match["pid"]) == pid:
                end_processes(entry.resolve(), [])  # a qemu-img still writing it
                size = allocated_bytes(entry)
                remove_tree(entry)
                freed.append(Freed(entry, KILLED, size))
    return freed


def allocated_bytes(path: Path) -> int:
    """Disk space taken below `path` (images are sparse), hard links once, on its file system only."""
    try:
        top = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return top.st_blocks * 512
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if _device(os.path.join(dirpath, d)) == top.st_dev]
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _device(path: str) -> int | None:
    try:
        return os.lstat(path).st_dev
    except OSError:
        return None


def readable_size(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
