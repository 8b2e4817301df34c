"""Publishing into a store on this host, as one transaction.

The image, its `.crc`, kernel and initramfs are copied to hidden temporaries first (the server skips
dot-files; docs/dnbd3-store.md, "Publishing recipe"). Then, under the store lock: the revision is
picked, the config fragment, iPXE entry and record are written as temporaries too, and everything is
linked into place, the image `.r<RID>` LAST, so that a revision is visible only once all of its files
are. What can fail after that (activation, the SIGHUP) withdraws the revision: the same locked links,
reversed, image first. Activation replaces `<boot-dir>/ipxe` (the entry that follows the active revision;
removed for a revision without kernel and initramfs) and then `<boot-dir>/config`, each by a rename, the
entry first: a client that fetched the new entry fetches the new config after it. Withdrawing puts both
back from hidden hard links, in the same order. Every write failure (no space, no inodes, a
read-only file system) is a one-line error and leaves only what was there before (no empty directory
either).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from stage4.dnbd3.crc import Digest, digest_and_copy
from stage4.dnbd3.store import Store, fsync_dir
from stage4.errors import InputError, Stage4Error
from stage4.export import revisions
from stage4.export.job import CONFIG_TGZ, Job, Publication, amended
from stage4.export.records import ACTIVE_CONFIG, ACTIVE_IPXE, recorded_boot_dir
from stage4.export.reload import reload_server
from stage4.export.tempfiles import CreatedDirs, TempFile, write_error


class LocalExport:
    """One export into a local store; `run()` does it all or leaves the store as it was."""

    def __init__(self, job: Job, store: Store, boot_dir: Path | None):
        self.job, self.store = job, store
        self.directory = (store.root / job.name).parent
        self.meta = store.meta_dir(job.name)
        self.boot = Path(boot_dir) if boot_dir else self.meta
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.temps: list[TempFile] = []
        self.dirs = CreatedDirs()
        self.linked: list[Path] = []  # final names made so far, in order (the image last)
        # The active files this export replaces (the entry first, then the config): hidden hard links to
        # what they were, None where there was none; and those replaced so far.
        self.previous: dict[str, Path | None] = {}
        self.activated: list[str] = []

    def temp(
        self, directory: Path, stem: str, kind: str = "", *, what: str, locked: bool = False
    ) -> TempFile:
        # Created and flock'ed under the store lock: another export's cleanup (which runs under that lock)
        # must never find our file in the instant between its creation and its flock.
        with contextlib.nullcontext() if locked else self.store.lock():
            self.dirs.make(directory, what)
            item = TempFile(directory, stem, self.token, kind, what)
        self.temps.append(item)
        return item

    def run(self) -> Publication:
        job = self.job
        try:
            try:
                image = self.temp(self.directory, job.leaf, what="the image")
                try:
                    digest = digest_and_copy(job.image, image.fd)
                    os.fsync(image.fd)
                except OSError as exc:
                    raise image.failed(exc) from None
                crc = self.temp(self.directory, job.leaf, ".crc", what="the .crc")
                crc.write(digest.crc_file)
                boot = {}
                for kind, source in job.boot_sources.items():
                    boot[kind] = self.temp(self.boot, kind, what=f"the {kind}")
                    boot[kind].copy_from(source)
                with self.store.lock():
                    rid = self.commit(image, crc, boot, digest)
            except Stage4Error as exc:
                raise amended(exc, "nothing published") from None
        except BaseException:
            with self.store.lock(required=False):
                self.withdraw()
                self.close()
                self.dirs.remove_empty()
            raise
        finally:
            self.close()
        image_path = str(self.directory / f"{job.leaf}.r{rid}")
        return job.publication(str(self.store.root), rid, digest, image_path, str(self.boot), str(self.meta))

    def commit(self, image: TempFile, crc: TempFile, boot: dict[str, TempFile], digest: Digest) -> int:
        job, store = self.job, self.store
        for directory in {self.directory, self.boot, self.meta}:
            store.remove_stale_temporaries(directory)
        taken = revisions.taken_rids(store, job.name, [self.boot])
        rid = job.rid or revisions.next_rid(job.name, taken)
        if rid in taken:
            raise InputError(f"{job.name}: revision {rid} exists in {store.root}; it is never overwritten")
        boot_dir = recorded_boot_dir(os.path.abspath(store.root), os.path.abspath(self.boot))
        texts = job.texts(rid, digest, boot_dir)
        written = {}
        for kind, directory in (("config", self.boot), ("ipxe", self.boot), ("record", self.meta)):
            if kind in texts:
                written[kind] = self.temp(
                    directory, "publication" if kind == "record" else kind, what=f"the {kind}", locked=True
                )
                written[kind].write(texts[kind].encode())
        active: dict[str, TempFile | None] = {}
        if job.activate:
            for file, kind, what in (
                (ACTIVE_IPXE, "active-ipxe", "entry"),
                (ACTIVE_CONFIG, "config", "config"),
            ):
                if kind in texts:
                    temp = self.temp(self.boot, file, ".new", what=f"the active {what}", locked=True)
                    temp.write(texts[kind].encode())
                    active[file] = temp
                elif os.path.lexists(self.boot / file):
                    active[file] = None  # an entry for another kernel: removed with this activation
                else:
                    continue
                self.previous[file] = None
                if (self.boot / file).is_file():  # a hidden hard link to it (no space needed): rollback
                    old = self.boot / f".{file}.stage4-{self.token}.old.part"
                    try:
                        os.link(self.boot / file, old)
                    except OSError as exc:
                        raise write_error(f"a copy of the active {what}", self.boot, exc) from None
                    self.previous[file] = old
        # The record first (it names the boot directory, so `revisions --check` finds a crash's leftovers),
        # the image last.
        order = [(written["record"], self.meta / f"publication.r{rid}.json", "a publication record")]
        order += [
            (boot[k], self.boot / f"{k}.r{rid}", f"a published {k}")
            for k in ("kernel", "initrd", CONFIG_TGZ)
            if k in boot
        ]
        order += [(written["config"], self.boot / f"config.r{rid}", "a published config")]
        if "ipxe" in written:
            order += [(written["ipxe"], self.boot / f"ipxe.r{rid}", "a published iPXE entry")]
        order += [
            (crc, self.directory / f"{job.leaf}.r{rid}.crc", "a published .crc"),
            (image, self.directory / f"{job.leaf}.r{rid}", "a published revision"),
        ]
        for temp, target, what in order:
            temp.link(target, what)
            self.linked.append(target)
        self._sync()
        # The revision is visible now; whatever fails from here on withdraws it.
        try:
            for file, new in active.items():  # the entry first
                self.activated.append(file)
                if new is not None:
                    new.replace(self.boot / file)
                else:
                    try:
                        os.unlink(self.boot / file)
                    except OSError as exc:
                        raise write_error(f"the active {file} (removing it)", self.boot, exc) from None
            if job.reload_pidfile is not None:
                reload_server(job.reload_pidfile)
        except Stage4Error as exc:
            self.withdraw()
            raise amended(exc, f"revision {rid} of {job.name} withdrawn") from None
        for previous in self.previous.values():
            if previous is not None:
                previous.unlink()
        self.previous.clear()
        return rid

    def withdraw(self) -> None:
        """Remove the final names made so far, the image first, and put the previous active entry and config
        back. Call under the store lock."""
        for path in reversed(self.linked):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for file, previous in self.previous.items():  # the entry first
            if file not in self.activated:
                if previous is not None:
                    previous.unlink()
            elif previous is not None:
                os.replace(previous, self.boot / file)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.boot / file)
        self.previous.clear()
        self.activated.clear()
        if self.linked:
            self._sync()
        self.linked.clear()

    def _sync(self) -> None:
        for directory in (self.directory, self.boot, self.meta):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(directory)

    def close(self) -> None:
        for item in self.temps:
            item.close()
        self.temps.clear()


def publish_local(job: Job, store: Store, boot_dir: Path | None) -> Publication:
    return LocalExport(job, store, boot_dir).run()
