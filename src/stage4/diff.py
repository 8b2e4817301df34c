"""`stage4 diff A B`: what changed between two builds, for people (text) and CI (JSON).

A and B are each a stage4 manifest (base.json, dev.json, prod.json), a built image (the manifest beside it:
prod.qcow2 -> prod.json), or an exported revision: its publication record (`publication.r<RID>.json`) or
the revision file in the store (`<store>/<name>.r<RID>`, its record in `<store>/.stage4/<name>/`). A
record is read through the build manifest it carries (key `build`) or names when that is still there
and has the recorded identity; else only what the record itself says is compared.

Compared: packages (added, removed, changed, with versions), kernels, initramfs dracut modules, extra
kernel modules, image sizes, the identities of the layers, the kernel hold; with `files`, every path of
the two root filesystems (type, mode, size, sha256 or symlink target), read from read-only loop mounts
of raw copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NotRequired, TypedDict, TypeVar

from stage4 import manifest as manifests
from stage4.config import DEFAULT_IDENTIFIER
from stage4.errors import InputError
from stage4.image import filesystem
from stage4.image.inspect import detect_identifier
from stage4.image.partitions import partitions, raw_view, root_partition
from stage4.manifest import LAYERS
from stage4.runner import Runner

RECORD_FORMAT = "stage4-publication/1"
META_DIR = ".stage4"  # where export keeps the records of a store's names
_REVISION = re.compile(r"^(?P<name>.+)\.r(?P<rid>\d+)$")
_T = TypeVar("_T")


class Pair(TypedDict, Generic[_T]):
    a: _T
    b: _T
    changed: bool


class VersionChange(TypedDict):
    a: str
    b: str


class PackageDiff(TypedDict):
    added: dict[str, str]  # name -> version
    removed: dict[str, str]
    changed: dict[str, VersionChange]


class TreeEntry(TypedDict, total=False):
    """One path of a root filesystem: mode, owner and type always; the rest depending on the type."""

    mode: str
    uid: int
    gid: int
    type: str
    size: int
    sha256: str
    target: str
    rdev: int


class TreeDiff(TypedDict):
    added: list[str]
    removed: list[str]
    changed: dict[str, list[str]]  # path -> the facts that differ


class SideInfo(TypedDict):
    what: str
    kind: str
    revision: int | None


class DiffResult(TypedDict):
    """What `compare` finds (what `stage4 diff --json` prints)."""

    a: SideInfo
    b: SideInfo
    identities: dict[str, Pair[str | None]]
    kernel: Pair[list[str]]
    dracut_modules: Pair[list[str] | None]
    kernel_modules: Pair[list[str] | None]
    kernel_hold: Pair[list[str] | None]
    packages: PackageDiff | None
    sizes: dict[str, Pair[int | None]]
    files: NotRequired[TreeDiff]


@dataclass
class Side:
    """One of the two things compared, reduced to the facts a diff needs."""

    label: str
    kind: str  # base, dev, prod (a build's manifest) or revision (an export record without its manifest)
    identities: dict[str, str] = field(default_factory=dict)  # layer -> identity
    packages: dict[str, str] | None = None  # None: not known (e.g. a record whose manifest is gone)
    kernels: list[str] = field(default_factory=list)
    dracut_modules: list[str] | None = None
    kernel_modules: list[str] | None = None
    kernel_hold: list[str] | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    image: Path | None = None
    identifier: str | None = None
    revision: int | None = None

    def describe(self) -> str:
        ident = self.identities.get(self.kind) or self.identities.get("build") or "?"
        rev = f" revision {self.revision}" if self.revision is not None else ""
        return f"{self.label} ({self.kind}{rev}, identity {ident[:16]})"


# --- reading the two sides ----------------------------------------------------------------------------------


def load(target: Path) -> Side:
    """The side `target` names: a manifest, a built image, a publication record or a store revision."""
    target = Path(target)
    if not target.is_file():
        raise InputError(f"diff: {target}: no such file")
    if target.suffix == ".json":
        data = _read_json(target)
        if data.get("format") == RECORD_FORMAT:
            return from_record(data, str(target))
        return from_manifest(data, target)
    if record := _record_of_revision(target):
        return from_record(record, str(target), image=target)
    manifest = manifests.beside(target)
    data = _read_json(manifest) if manifest.is_file() else {}
    if data.get("image", {}).get("file") != target.name:
        raise InputError(
            f"diff: {target}: no stage4 manifest beside it ({manifest.name} describing "
            f"{target.name}), and no export record names it"
        )
    side = from_manifest(data, manifest)
    side.label = str(target)
    return side


def from_manifest(manifest: dict[str, Any], path: Path, beside_a_file: bool = True) -> Side:
    """A build's facts from its manifest; the identities of its parents from the manifests beside it."""
    kind = manifest.get("kind")
    if kind not in LAYERS or not isinstance(manifest.get("identity"), str):
        raise InputError(
            f"diff: {path}: not a stage4 manifest (expected 'kind' base, dev or prod and an 'identity')"
        )
    side = Side(str(path), kind, identifier=manifest.get("identifier"))
    identities: dict[str, str | None] = {kind: manifest["identity"]}
    parent = manifest.get("parent")
    for layer in reversed(LAYERS[: LAYERS.index(kind)]):  # walk down the chain beside the manifest
        identities[layer] = parent
        other = path.parent / manifests.file_name(layer)
        beside = _read_json(other) if beside_a_file and other.is_file() else {}
        parent = beside.get("parent") if beside.get("identity") == parent else None
    side.identities = {layer: ident for layer, ident in identities.items() if ident}
    side.packages = manifest.get("packages") if isinstance(manifest.get("packages"), dict) else None
    version = manifest.get("kernel_version")
    side.kernels = [version] if version else list(manifest.get("kernel_versions") or [])
    artifacts = manifest.get("artifacts") or {}
    if kind == "dev":
        side.dracut_modules = artifacts.get("initramfs_dracut_modules")
        side.kernel_modules = sorted(
            Path(a["file"]).name
            for c in artifacts.get("components", {}).values()
            for a in c
            if a.get("kind") == "module"
        )
    elif kind == "prod":
        side.dracut_modules = manifest.get("dracut_modules")
        side.kernel_modules = sorted(
            Path(a["src"]).name for a in manifest.get("artifacts_installed", []) if a.get("kind") == "module"
        )
        side.kernel_hold = (manifest.get("kernel_hold") or {}).get("packages")
    image = manifest.get("image") or {}
    side.sizes = {key: image[key] for key in ("size", "virtual_size") if isinstance(image.get(key), int)}
    if image.get("file") and (path.parent / image["file"]).is_file():
        side.image = path.parent / image["file"]
    return side


def from_record(record: dict[str, Any], label: str, image: Path | None = None) -> Side:
    """An exported revision: the build manifest the record carries (key `build`) or names (if that file is
    still the one of the recorded identity: the next build of the image overwrites it), else the record
    alone."""
    source = record.get("source") or {}
    manifest_path = Path(source["manifest"]) if source.get("manifest") else Path(label)
    if isinstance(record.get("build"), dict):
        manifest = record["build"]
    else:
        manifest = _read_json(manifest_path) if source.get("manifest") and manifest_path.is_file() else {}
    if manifest and manifest.get("identity") == source.get("identity"):
        side = from_manifest(manifest, manifest_path, beside_a_file=manifest is not record.get("build"))
        side.label = label
    else:
        side = Side(
            label,
            "revision",
            identities={"build": source["identity"]} if source.get("identity") else {},
            identifier=record.get("identifier"),
            dracut_modules=source.get("dracut_modules") or None,
        )
    side.revision = record.get("rid")
    size = source.get("size") or record.get("size")
    if side.kind == "revision" and isinstance(size, int):
        side.sizes = {"size": size}
    side.image = image or (Path(source["image"]) if source.get("image") else None)
    if side.image is not None and not side.image.is_file():
        side.image = None
    return side


def _record_of_revision(target: Path) -> dict[str, Any] | None:
    """The record of a revision file `<store>/<name>.r<RID>`: in `<store>/.stage4/<name>/` of some parent."""
    found = _REVISION.match(target.name)
    if not found:
        return None
    target = target.absolute()
    for store in target.parents:
        name = (
            str(target.parent.relative_to(store) / found["name"]) if target.parent != store else found["name"]
        )
        record = store / META_DIR / name / f"publication.r{found['rid']}.json"
        if record.is_file():
            data = _read_json(record)
            return data if data.get("format") == RECORD_FORMAT else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` (a manifest or a record: free-form JSON)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"diff: {path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"diff: {path}: not a JSON object")
    return data


# --- comparing ----------------------------------------------------------------------------------------------


def _pair(a: _T, b: _T) -> Pair[_T]:
    return {"a": a, "b": b, "changed": a != b}


def compare_packages(a: dict[str, str] | None, b: dict[str, str] | None) -> PackageDiff | None:
    if a is None or b is None:
        return None
    return {
        "added": {n: b[n] for n in sorted(b.keys() - a.keys())},
        "removed": {n: a[n] for n in sorted(a.keys() - b.keys())},
        "changed": {n: {"a": a[n], "b": b[n]} for n in sorted(a.keys() & b.keys()) if a[n] != b[n]},
    }


def compare(a: Side, b: Side, files: TreeDiff | None = None) -> DiffResult:
    """The diff of two sides as plain data (what `--json` prints)."""
    layers = [layer for layer in (*LAYERS, "build") if layer in a.identities or layer in b.identities]
    found: DiffResult = {
        "a": {"what": a.label, "kind": a.kind, "revision": a.revision},
        "b": {"what": b.label, "kind": b.kind, "revision": b.revision},
        "identities": {layer: _pair(a.identities.get(layer), b.identities.get(layer)) for layer in layers},
        "kernel": _pair(a.kernels, b.kernels),
        "dracut_modules": _pair(a.dracut_modules, b.dracut_modules),
        "kernel_modules": _pair(a.kernel_modules, b.kernel_modules),
        "kernel_hold": _pair(a.kernel_hold, b.kernel_hold),
        "packages": compare_packages(a.packages, b.packages),
        "sizes": {
            key: _pair(a.sizes.get(key), b.sizes.get(key))
            for key in ("size", "virtual_size")
            if key in a.sizes or key in b.sizes
        },
    }
    if files is not None:
        found["files"] = files
    return found


def diff(a: Path, b: Path, files: bool = False, runner: Runner | None = None) -> DiffResult:
    """Compare A and B (see the module's description); with `files`, their root filesystems too."""
    first, second = load(a), load(b)
    tree_diff = None
    if files:
        image_a, image_b = _image_for_files(first), _image_for_files(second)
        runner = runner or Runner()
        tree_diff = compare_trees(
            tree(image_a, first.identifier, runner), tree(image_b, second.identifier, runner)
        )
    return compare(first, second, tree_diff)


def _image_for_files(side: Side) -> Path:
    if side.image is None:
        raise InputError(f"diff --files: {side.label}: its image file is not there")
    return side.image


def summary(previous_record: dict[str, Any], new_record: dict[str, Any]) -> str:
    """What `stage4 export` prints: the new revision against the previous one of the name."""
    return text(
        compare(
            from_record(previous_record, f"revision {previous_record.get('rid')}"),
            from_record(new_record, f"revision {new_record.get('rid')}"),
        )
    )


# --- root filesystems ---------------------------------------------------------------------------------------


def tree(image: Path, identifier: str | None, runner: Runner) -> dict[str, TreeEntry]:
    """Every path of the image's root filesystem -> type, mode, size and sha256 (or symlink target)."""
    with _mounted_root(image, identifier, runner) as root:
        found: dict[str, TreeEntry] = {}
        for folder, dirs, names in os.walk(root):
            for name in (*dirs, *names):
                path = Path(folder) / name
                facts = os.lstat(path)
                entry: TreeEntry = {
                    "mode": f"{stat.S_IMODE(facts.st_mode):04o}",
                    "uid": facts.st_uid,
                    "gid": facts.st_gid,
                }
                if stat.S_ISREG(facts.st_mode):
                    with path.open("rb") as handle:
                        entry["type"] = "file"
                        entry["size"] = facts.st_size
                        entry["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
                elif stat.S_ISLNK(facts.st_mode):
                    entry["type"], entry["target"] = "symlink", os.readlink(path)
                elif stat.S_ISDIR(facts.st_mode):
                    entry["type"] = "dir"
                else:
                    entry["type"], entry["rdev"] = "special", facts.st_rdev
                found["/" + str(path.relative_to(root))] = entry
        found.pop("/lost+found", None)
        return found


def compare_trees(a: Mapping[str, TreeEntry], b: Mapping[str, TreeEntry]) -> TreeDiff:
    changed: dict[str, list[str]] = {}
    for path in sorted(a.keys() & b.keys()):
        if a[path] != b[path]:
            changed[path] = sorted(
                key for key in a[path].keys() | b[path].keys() if a[path].get(key) != b[path].get(key)
            )
    return {"added": sorted(b.keys() - a.keys()), "removed": sorted(a.keys() - b.keys()), "changed": changed}


@contextlib.contextmanager
def _mounted_root(image: Path, identifier: str | None, runner: Runner) -> Iterator[Path]:
    with raw_view(image, runner) as raw:
        _, parts = partitions(raw, runner)
        wanted = identifier or detect_identifier(parts) or DEFAULT_IDENTIFIER
        part = root_partition(parts, wanted)
        if part is None:
            raise InputError(f"diff --files: {image}: no partition named {wanted!r}")
        with filesystem.FilesystemReader(raw, part, runner, mount=True) as reader:
            yield reader.mountpoint


# --- text ---------------------------------------------------------------------------------------------------


def _size(value: int | None) -> str:
    return "?" if value is None else f"{value / (1 << 20):.1f} MiB"


def _items(values: list[str] | None) -> str:
    return "unknown" if values is None else (", ".join(values) or "none")


def text(found: DiffResult) -> str:
    """The diff for people: one section per kind of fact, unchanged ones in one line."""
    lines = [f"a: {found['a']['what']}", f"b: {found['b']['what']}"]
    for layer, pair in found["identities"].items():
        a, b = (pair["a"] or "-")[:16], (pair["b"] or "-")[:16]
        lines.append(f"{layer} identity: {a} -> {b}" if pair["changed"] else f"{layer} identity: {a} (same)")
    lists: list[tuple[Pair[list[str]] | Pair[list[str] | None], str]] = [
        (found["kernel"], "kernel"),
        (found["dracut_modules"], "initramfs dracut modules"),
        (found["kernel_modules"], "extra kernel modules"),
        (found["kernel_hold"], "held packages"),
    ]
    for values, title in lists:
        if values["a"] is None and values["b"] is None:
            continue
        lines.append(
            f"{title}: {_items(values['a'])} -> {_items(values['b'])}"
            if values["changed"]
            else f"{title}: {_items(values['a'])} (same)"
        )
    packages = found["packages"]
    if packages is None:
        lines.append("packages: not known for both sides")
    else:
        lines.append(
            f"packages: {len(packages['added'])} added, {len(packages['removed'])} removed, "
            f"{len(packages['changed'])} changed"
        )
        lines += [f"  + {name} {version}" for name, version in packages["added"].items()]
        lines += [f"  - {name} {version}" for name, version in packages["removed"].items()]
        lines += [f"  ~ {name} {v['a']} -> {v['b']}" for name, v in packages["changed"].items()]
    for key, title in (("size", "image size"), ("virtual_size", "virtual size")):
        if key in found["sizes"]:
            sizes = found["sizes"][key]
            size_a, size_b = sizes["a"], sizes["b"]
            if not sizes["changed"]:
                lines.append(f"{title}: {_size(size_a)} (same)")
                continue
            delta = "" if size_a is None or size_b is None else f" ({(size_b - size_a) / (1 << 20):+.1f} MiB)"
            lines.append(f"{title}: {_size(size_a)} -> {_size(size_b)}{delta}")
    if "files" in found:
        files = found["files"]
        lines.append(
            f"files: {len(files['added'])} added, {len(files['removed'])} removed, "
            f"{len(files['changed'])} changed"
        )
        lines += [f"  + {path}" for path in files["added"]]
        lines += [f"  - {path}" for path in files["removed"]]
        lines += [f"  ~ {path} ({', '.join(keys)})" for path, keys in files["changed"].items()]
    return "\n".join(lines) + "\n"
