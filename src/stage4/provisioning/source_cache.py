"""stage4's source cache: git commits and tarballs kept so that builds work on hosts without internet.

Layout under `<cache_dir>/sources/`:

    git/<name>-<hash of URL>/mirror.git   bare repository with every cached commit of that URL, each kept
                                          by refs/stage4/<hash of ref> so that no gc drops it
    git/<name>-<hash of URL>/refs.json    {"url": URL, "refs": {REF: {"commit", "when", "from"}}}
    tarball/<sha256>, <sha256>.json       the verified file, and its URL, date and origin: a tarball
                                          source, or a download an mltk module makes in the layer

Git entries are keyed by URL and ref, tarballs by their sha256 (the URL is only recorded; a download is
served by its URL): the keys of the
layer identities, so a build from the cache gets the identity of a build from the network. Entries come
from the network (every successful fetch refreshes its entry) or from `stage4 sources import`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NotRequired, TypedDict

from stage4.errors import InputError, StepFailed
from stage4.fsutil import (
    dir_size,
    exclusive_lock,
    place_atomically,
    sha256_file,
    temporary_sibling,
    write_json_atomically,
)
from stage4.runner import Runner

GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
# A reachability probe: long enough for a slow link, short enough that an offline build does not stall.
PROBE_TIMEOUT = 15
FETCH_TIMEOUT = 300
FULL_COMMIT = re.compile(r"^[0-9a-fA-F]{40}([0-9a-fA-F]{24})?$")


# What refs.json keeps of one (URL, ref), and the whole file.
GitRecord = TypedDict("GitRecord", {"commit": str, "when": str, "from": str})


class GitRecords(TypedDict):
    url: str
    refs: dict[str, GitRecord]


# <sha256>.json beside a cached file; "kind" is "tarball" (also when absent) or "download".
TarballRecord = TypedDict(
    "TarballRecord",
    {"url": str, "sha256": str, "when": str, "from": str, "size": int, "kind": NotRequired[str]},
)

# Entry.to_dict(): what `stage4 sources --json` shows.
EntryDict = TypedDict(
    "EntryDict",
    {
        "kind": str,
        "url": str,
        "ref": str | None,
        "commit": str | None,
        "sha256": str | None,
        "size": int,
        "when": str,
        "from": str,
    },
)


class Unreachable(Exception):
    """The network copy of a source cannot be reached (the reason is the message)."""


@dataclass
class Entry:
    """One cached source: a git URL at a ref, or a file by its sha256 (a tarball, or a download)."""

    kind: str
    url: str
    ref: str | None
    commit: str | None
    sha256: str | None
    size: int
    when: str
    origin: str

    def to_dict(self) -> EntryDict:
        return {
            "kind": self.kind,
            "url": self.url,
            "ref": self.ref,
            "commit": self.commit,
            "sha256": self.sha256,
            "size": self.size,
            "when": self.when,
            "from": self.origin,
        }


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def failure_detail(exc: StepFailed) -> str:
    """The command's own words from a StepFailed, without the step name and log path."""
    return str(exc).split(" failed: ", 1)[-1].split(" (log: ")[0]


def _network_reason(exc: StepFailed) -> str:
    """Why git could not reach a URL, in git's last words ("Could not resolve host: github.com")."""
    detail = failure_detail(exc).split("fatal: ")[-1]
    return re.sub(r"^(git exited with \d+: |unable to access '[^']*': )", "", detail)


class SourceCache:
    def __init__(self, cache_dir: Path):
        self.root = cache_dir / "sources"

    # -- git --------------------------------------------------------------------------------------------

    def _git_dir(self, url: str) -> Path:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git"))[:40]
        return self.root / "git" / f"{name or 'repo'}-{_key(url)}"

    def mirror(self, url: str) -> Path:
        return self._git_dir(url) / "mirror.git"

    def _records(self, url: str) -> GitRecords:
        path = self._git_dir(url) / "refs.json"
        if not path.is_file():
            return {"url": url, "refs": {}}
        records: GitRecords = json.loads(path.read_text(encoding="utf-8"))
        return records

    def git_record(self, url: str, ref: str) -> GitRecord | None:
        """The commit cached for (url, ref), when and where from; None if it is not cached."""
        return self._records(url)["refs"].get(ref)

    def git_entry(self, url: str, ref: str) -> Entry | None:
        record = self.git_record(url, ref)
        return None if record is None else self._git_entry(url, ref, record)

    def _git_entry(self, url: str, ref: str, record: GitRecord) -> Entry:
        return Entry(
            "git",
            url,
            ref,
            record["commit"],
            None,
            dir_size(self.mirror(url)),
            record["when"],
            record["from"],
        )

    def has_commit(self, url: str, commit: str, runner: Runner, step: str) -> bool:
        if not self.mirror(url).is_dir():
            return False
        return (
            runner.run(
                ["git", "--git-dir", self.mirror(url), "cat-file", "-e", f"{commit}^{{commit}}"],
                step=step,
                check=False,
            ).returncode
            == 0
        )

    @contextmanager
    def _locked(self, url: str, runner: Runner) -> Iterator[None]:
        """One writer per URL's mirror; a second build of the same source waits."""
        lock = self._git_dir(url).with_name(self._git_dir(url).name + ".lock")
        with exclusive_lock(lock, lambda: runner.display.info(f"waiting for another stage4 caching {url}")):
            yield

    def _ensure_mirror(self, url: str, runner: Runner, step: str) -> Path:
        mirror = self.mirror(url)
        if not mirror.is_dir():
            partial = mirror.with_name(".mirror.git.partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            runner.run(["git", "init", "--quiet", "--bare", "--template=", partial], step=step)
            partial.rename(mirror)
        return mirror

    def _record(self, url: str, ref: str, commit: str, origin: str, runner: Runner, step: str) -> Entry:
        """Keep `commit` for (url, ref) (caller holds the URL's lock)."""
        runner.run(
            ["git", "--git-dir", self.mirror(url), "update-ref", f"refs/stage4/{_key(ref)}", commit],
            step=step,
        )
        records = self._records(url)
        record: GitRecord = {"commit": commit, "when": _now(), "from": origin}
        records["refs"][ref] = record
        write_json_atomically(self._git_dir(url) / "refs.json", records)
        return self._git_entry(url, ref, record)

    def import_git(self, url: str, ref: str, directory: Path, runner: Runner, at: str | None = None) -> Entry:
        """Cache (url, ref) from a local clone: the commit `ref` (or the revision `at`) names in
        `directory`."""
        step = f"import {url}"
        directory = directory.expanduser().absolute()
        if not directory.is_dir():
            raise InputError(f"{directory}: no such directory (give a clone or checkout of {url})")
        try:
            top = runner.run(["git", "-C", directory, "rev-parse", "--show-prefix"], step=step, capture=True)
        except StepFailed as exc:
            raise InputError(f"{directory}: not a git repository ({failure_detail(exc)})") from None
        if top.stdout.strip():
            raise InputError(
                f"{directory}: not the top of a git repository (it is {top.stdout.strip()!r} inside "
                "one); give the clone's own directory"
            )
        candidates = [at] if at else [ref, f"refs/remotes/origin/{ref}"]
        commit = next(
            (c for c in (self._rev_parse(directory, name, runner, step) for name in candidates) if c), None
        )
        if commit is None:
            raise InputError(f"{directory}: the git repository has no branch, tag or commit {at or ref!r}")
        with self._locked(url, runner):
            mirror = self._ensure_mirror(url, runner, step)
            _fetch_into(mirror, ["--no-tags", directory, f"+{commit}:refs/stage4/{_key(ref)}"], runner, step)
            return self._record(url, ref, commit, str(directory), runner, step)

    @staticmethod
    def _rev_parse(repo: Path, name: str, runner: Runner, step: str) -> str | None:
        found = runner.run(
            ["git", "-C", repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}"],
            step=step,
            capture=True,
            check=False,
        )
        return found.stdout.strip() if found.returncode == 0 else None

    def fetch_from_network(self, url: str, ref: str, runner: Runner, step: str) -> str:
        """Bring (url, ref) up to date from the network and return its commit; Unreachable if offline."""
        try:
            listing = runner.run(
                ["git", "ls-remote", url, ref], step=step, env=GIT_ENV, capture=True, timeout=PROBE_TIMEOUT
            ).stdout
        except StepFailed as exc:
            raise Unreachable(_network_reason(exc)) from None
        advertised = _advertised(listing, ref)
        with self._locked(url, runner):
            if advertised is None or not self.has_commit(url, advertised, runner, step):
                mirror = self._ensure_mirror(url, runner, step)
                try:
                    _fetch_into(
                        mirror,
                        ["--force", url, "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"],
                        runner,
                        step,
                        timeout=FETCH_TIMEOUT,
                    )
                except StepFailed as exc:
                    raise Unreachable(_network_reason(exc)) from None
            commit = advertised or self._resolve_in_mirror(url, ref, runner, step)
            if commit is None:
                raise StepFailed(step, f"{url} has no branch, tag or commit {ref!r}", runner.log_path)
            self._record(url, ref, commit, url, runner, step)
        return commit

    def _resolve_in_mirror(self, url: str, ref: str, runner: Runner, step: str) -> str | None:
        names = (
            f"refs/remotes/origin/{ref.removeprefix('refs/heads/')}",
            f"refs/tags/{ref.removeprefix('refs/tags/')}",
            ref,
        )
        return next(
            (c for c in (self._rev_parse(self.mirror(url), n, runner, step) for n in names) if c), None
        )

    def checkout(self, url: str, commit: str, tree: Path, runner: Runner, step: str) -> None:
        """The tree of `commit` at `tree` (a clone sharing the mirror's objects: no copy, no network)."""
        runner.run(
            ["git", "clone", "--quiet", "--shared", "--no-checkout", self.mirror(url), tree],
            step=step,
            env=GIT_ENV,
        )
        runner.run(["git", "-C", tree, "checkout", "--quiet", "--detach", commit], step=step, env=GIT_ENV)

    # -- tarballs ---------------------------------------------------------------------------------------

    def tarball_path(self, sha256: str) -> Path:
        return self.root / "tarball" / sha256

    def tarball(self, sha256: str, runner: Runner) -> Path | None:
        """The cached tarball with this sha256, verified; a damaged copy is dropped (and said so)."""
        path = self.tarball_path(sha256)
        if not path.is_file():
            return None
        if sha256_file(path) != sha256:
            runner.display.info(f"source cache: {path} no longer matches its sha256; dropped")
            path.unlink()
            path.with_name(path.name + ".json").unlink(missing_ok=True)
            return None
        return path

    def add_tarball(self, url: str, sha256: str, file: Path, origin: str, kind: str = "tarball") -> Entry:
        """Keep a copy of `file`, whose sha256 the caller verified."""
        target = self.tarball_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        with temporary_sibling(target) as partial:
            shutil.copyfile(file, partial)
            place_atomically(partial, target)
        record: TarballRecord = {
            "url": url,
            "sha256": sha256,
            "when": _now(),
            "from": origin,
            "size": target.stat().st_size,
            "kind": kind,
        }
        write_json_atomically(target.with_name(target.name + ".json"), record)
        return _tarball_entry(record)

    def import_tarball(self, url: str, sha256: str, file: Path) -> Entry:
        file, digest = _verified(file, f"the tarball of {url}", sha256)
        if not tarfile.is_tarfile(file):
            raise InputError(f"{file}: not a tar archive")
        return self.add_tarball(url, digest, file, str(file))

    def import_download(self, url: str, file: Path, sha256: str | None = None) -> Entry:
        """A file an mltk module downloads inside the layer, served there by its URL (any kind of file;
        its sha256 checked when given)."""
        if not re.match(r"^(https?|ftp)://", url):
            raise InputError(f"{url}: a download's URL starts with http://, https:// or ftp://")
        file, digest = _verified(file, f"the download of {url}", sha256)
        return self.add_tarball(url, digest, file, str(file), kind="download")

    # -- listing and removal ----------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        found = []
        for records_file in sorted((self.root / "git").glob("*/refs.json")):
            records: GitRecords = json.loads(records_file.read_text(encoding="utf-8"))
            url = records["url"]
            found += [self._git_entry(url, ref, records["refs"][ref]) for ref in sorted(records["refs"])]
        for record_file in sorted((self.root / "tarball").glob("*.json")):
            found.append(_tarball_entry(json.loads(record_file.read_text(encoding="utf-8"))))
        return found

    def remove(self, url: str, ref: str | None, sha256: str | None, runner: Runner) -> Entry:
        """Forget one entry: (url, ref) of a git URL, or the tarball with this sha256."""
        if sha256:
            path = self.tarball_path(sha256.lower())
            record = path.with_name(path.name + ".json")
            if not record.is_file():
                raise InputError(f"no tarball with sha256 {sha256} in the source cache ({self.root})")
            removed = _tarball_entry(json.loads(record.read_text(encoding="utf-8")))
            path.unlink(missing_ok=True)
            record.unlink()
            return removed
        if ref is None or (entry := self.git_entry(url, ref)) is None:
            raise InputError(
                f"{url} at {ref!r} is not in the source cache ({self.root}); see `stage4 sources`"
            )
        with self._locked(url, runner):
            records = self._records(url)
            del records["refs"][ref]
            if records["refs"]:
                runner.run(
                    ["git", "--git-dir", self.mirror(url), "update-ref", "-d", f"refs/stage4/{_key(ref)}"],
                    step=f"remove {url}",
                )
                write_json_atomically(self._git_dir(url) / "refs.json", records)
            else:
                shutil.rmtree(self._git_dir(url))
        return entry


def _verified(file: Path, what: str, sha256: str | None) -> tuple[Path, str]:
    """A file to import (its absolute path) and its sha256, which must be `sha256` when given."""
    file = file.expanduser().absolute()
    if sha256 is not None and not re.match(r"^[0-9a-fA-F]{64}$", sha256):
        raise InputError(f"--sha256 {sha256!r}: expected 64 hexadecimal digits")
    if not file.is_file():
        raise InputError(f"{file}: no such file (give {what})")
    digest = sha256_file(file)
    if sha256 is not None and digest != sha256.lower():
        raise InputError(f"{file}: sha256 is {digest}, not the given {sha256.lower()}")
    return file, digest


def _advertised(listing: str, ref: str) -> str | None:
    """The commit `git ls-remote` shows for a branch or tag named `ref` (a tag by the commit it points to)."""
    refs: dict[str, str] = {}  # name -> commit; the last line of a name wins
    for line in listing.splitlines():
        if "\t" in line:
            commit, name = line.split("\t", 1)
            refs[name] = commit
    for name in (f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", ref):
        if name in refs:
            return refs[name]
    return None


def _tarball_entry(record: TarballRecord) -> Entry:
    return Entry(
        record.get("kind", "tarball"),
        record["url"],
        None,
        None,
        record["sha256"],
        record["size"],
        record["when"],
        record["from"],
    )


def _fetch_into(
    mirror: Path, arguments: list[str | Path], runner: Runner, step: str, timeout: float | None = None
) -> None:
    """`git fetch` into a cache mirror (no automatic gc: the cached commits are kept by refs/stage4/)."""
    runner.run(
        ["git", "-c", "gc.auto=0", "--git-dir", mirror, "fetch", "--quiet", *arguments],
        step=step,
        env=GIT_ENV,
        timeout=timeout,
    )
