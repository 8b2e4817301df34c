"""What an export publishes (`Job`, checked inputs) and what it published (`Publication`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stage4.dnbd3.crc import Digest
from stage4.errors import Stage4Error
from stage4.export import records

CONFIG_TGZ = "config.tgz"  # the boot-directory file kind of a site's config tarball
NO_SERVER_WARNING = "no --server given: SLX_DNBD3_SERVERS in the config fragment is empty"


def amended(exc: Stage4Error, note: str) -> Stage4Error:
    """The same error (same class, same exit code) with a note appended to its one line."""
    exc.args = (f"{exc}; {note}",)
    return exc


@dataclass(frozen=True)
class Publication:
    """What `publish` wrote. Paths are local paths, or remote paths for a `host:/path` store."""

    store: str
    name: str
    rid: int
    image: str
    crc: str
    size: int
    source_size: int
    sha256: str
    identifier: str
    servers: list[str]
    source_identity: str | None
    kernel: str | None
    initrd: str | None
    config: str
    record: str
    ipxe: str | None = None
    config_tgz: str | None = None
    activated: bool = False
    active_ipxe: str | None = None  # with activation: the entry that follows the active revision
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Job:
    """Checked inputs of one export."""

    image: Path
    name: str
    rid: int | None
    kernel: Path | None
    initrd: Path | None
    servers: list[str]
    identifier: str
    source_identity: str | None
    activate: bool
    reload_pidfile: Path | None = None
    manifest: Path | None = None
    dracut_modules: tuple[str, ...] = ()
    origins: dict[str, str] = field(default_factory=dict)
    config_tgz: Path | None = None  # the site's config.tgz, published as config.tgz.r<RID>
    warnings: list[str] = field(default_factory=list)  # found while exporting, reported with the result

    @property
    def leaf(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def boot_sources(self) -> dict[str, Path]:
        sources = (("kernel", self.kernel), ("initrd", self.initrd), (CONFIG_TGZ, self.config_tgz))
        return {kind: Path(path) for kind, path in sources if path}

    @property
    def has_ipxe(self) -> bool:
        return self.kernel is not None and self.initrd is not None

    def boot_facts(self, rid: int | str) -> dict[str, records.BootFile]:
        return {
            kind: {
                "file": f"{kind}.r{rid}",
                "source": self.origins.get(kind) or str(source.resolve()),
                **records.file_facts(source),
            }
            for kind, source in self.boot_sources.items()
        }

    def texts(self, rid: int | str, digest: Digest, boot_dir: str) -> dict[str, str]:
        """The text files of revision `rid`: config fragment, iPXE entry (with kernel and initrd), record;
        with activation and an iPXE entry also the active entry `<boot-dir>/ipxe`."""
        note = records.comment(self.name, rid, digest.sha256, self.source_identity)
        source: records.RecordSource = {
            "image": str(self.image.resolve()),
            "size": digest.real_size,
            "identity": self.source_identity,
            "manifest": str(self.manifest) if self.manifest else None,
            "dracut_modules": list(self.dracut_modules),
        }
        record = records.record(
            name=self.name,
            rid=rid,
            size=digest.padded_size,
            sha256=digest.sha256,
            crc_file=digest.crc_file,
            identifier=self.identifier,
            servers=self.servers,
            source=source,
            boot_dir=boot_dir,
            boot_files=self.boot_facts(rid),
            ipxe=self.has_ipxe,
            build=json.loads(self.manifest.read_text(encoding="utf-8")) if self.manifest else None,
        )
        texts = {
            "config": records.config_fragment(
                self.servers,
                self.name,
                rid,
                self.identifier,
                note,
                f"{CONFIG_TGZ}.r{rid}" if self.config_tgz else None,
            ),
            "record": json.dumps(record, indent=2) + "\n",
        }
        if self.has_ipxe:
            texts["ipxe"] = records.ipxe_entry(rid, note)
            if self.activate:
                texts["active-ipxe"] = records.active_ipxe_entry(self.name, rid, note)
        return texts

    def publication(
        self, store: str, rid: int, digest: Digest, image: str, boot: str, meta: str
    ) -> Publication:
        return Publication(
            store=store,
            name=self.name,
            rid=rid,
            image=image,
            crc=f"{image}.crc",
            size=digest.padded_size,
            source_size=digest.real_size,
            sha256=digest.sha256,
            identifier=self.identifier,
            servers=self.servers,
            source_identity=self.source_identity,
            kernel=f"{boot}/kernel.r{rid}" if self.kernel else None,
            initrd=f"{boot}/initrd.r{rid}" if self.initrd else None,
            config=f"{boot}/config.r{rid}",
            record=f"{meta}/publication.r{rid}.json",
            ipxe=f"{boot}/ipxe.r{rid}" if self.has_ipxe else None,
            config_tgz=f"{boot}/{CONFIG_TGZ}.r{rid}" if self.config_tgz else None,
            activated=self.activate,
            active_ipxe=f"{boot}/{records.ACTIVE_IPXE}" if self.activate and self.has_ipxe else None,
            warnings=[*self.warnings, *([] if self.servers else [NO_SERVER_WARNING])],
        )
