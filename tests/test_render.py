"""`stage4 render`: the distribution catalog's answer files and the Packer template tree.

Every template is checked by the real tools: `packer validate` (Packer from apt), `ksvalidator` for the
kickstart's release, `debconf-set-selections --checkonly` for preseeds, a YAML parse plus subiquity's
required keys for autoinstall. Rendering uses identifier `system`, so the default `SLX_SYS` must not
appear anywhere.
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

import pytest
import yaml
from pydantic import ValidationError

from stage4 import distributions
from stage4.builders import credentials
from stage4.builders.packer import RenderTarget, render_tree
from stage4.builders.packer_iso import checksum_from_file, resolve_iso
from stage4.builders.packer_template import hcl_string
from stage4.config import ImageConfig, MachineConfig
from stage4.distributions.debian import Debian12
from stage4.distributions.ubuntu import Ubuntu2404
from stage4.errors import InputError
from stage4.runner import Runner

ID = "system"
INSTALLER_DISTROS = [
    "alma-8",
    "alma-9",
    "centos-7",
    "debian-12",
    "debian-13",
    "rocky-8",
    "rocky-9",
    "ubuntu-16.04",
    "ubuntu-18.04",
    "ubuntu-22.04",
    "ubuntu-24.04",
]
KICKSTART_VERSIONS = {
    "centos-7": "RHEL7",
    "rocky-8": "RHEL8",
    "alma-8": "RHEL8",
    "rocky-9": "RHEL9",
    "alma-9": "RHEL9",
}
PRESEED = ["debian-12", "debian-13", "ubuntu-16.04", "ubuntu-18.04"]
AUTOINSTALL = ["ubuntu-22.04", "ubuntu-24.04"]
PACKER_ENV = {**os.environ, "CHECKPOINT_DISABLE": "1"}

needs_packer = pytest.mark.skipif(
    shutil.which("packer") is None, reason="packer is not installed (apt: packer)"
)
needs_debconf = pytest.mark.skipif(
    shutil.which("debconf-set-selections") is None, reason="debconf-set-selections is not installed"
)


def _render(out: Path, names: list[str], *, efi: bool = False, filesystem: str = "ext4", **iso: str) -> Path:
    targets = [
        RenderTarget(ImageConfig(distribution=name, identifier=ID, filesystem=filesystem), efi=efi, **iso)
        for name in names
    ]
    render_tree(out, targets, MachineConfig(), Runner())
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every installer release, catalog ISOs (remote checksum files), BIOS, ext4."""
    return _render(tmp_path_factory.mktemp("render") / "tree", INSTALLER_DISTROS)


@pytest.fixture(scope="module")
def efi_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _render(
        tmp_path_factory.mktemp("render-efi") / "tree", INSTALLER_DISTROS, efi=True, filesystem="xfs"
    )


@pytest.fixture(scope="module")
def fake_iso(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    iso = tmp_path_factory.mktemp("iso") / "installer.iso"
    iso.write_bytes(os.urandom(4096))
    return iso, hashlib.sha256(iso.read_bytes()).hexdigest()


def _answer(tree: Path, name: str) -> str:
    folder = tree / "http" / name
    kind = distributions.get(name).installer
    return (
        folder / {"preseed": "preseed.cfg", "kickstart": "ks.cfg", "autoinstall": "user-data"}[kind]
    ).read_text()


# ----- catalog ------------------------------------------------------------------------------------


def test_catalog_lists_every_installer_release() -> None:
    assert distributions.installer_names() == INSTALLER_DISTROS
    for name in INSTALLER_DISTROS:
        dist = distributions.get(name)
        assert dist.installer in ("preseed", "autoinstall", "kickstart")
        assert dist.iso_url.startswith("https://") and dist.iso_url.endswith(".iso")
        assert re.match(r"^(file:https://\S+|sha256:[0-9a-f]{64})$", dist.iso_checksum)
        assert dist.boot_command and dist.boot_command_efi
        assert all("%HTTP%" not in key for key in dist.boot_keys(False, "http://x"))
        assert any("http://x/" in key for key in dist.boot_keys(False, "http://x"))
    assert distributions.get("ubuntu-16.04").template_name() == "ubuntu-16.04-amd64"
    for name in KICKSTART_VERSIONS:
        assert any("inst.gpt" in key for key in distributions.get(name).boot_keys(False, "u"))


def test_bootstrap_attributes_unchanged() -> None:
    """The bootstrap builder's view of the apt releases keeps working."""
    assert Debian12.bootstrappable and Ubuntu2404.bootstrappable
    assert Debian12.codename == "bookworm" and Debian12.kernel_package == "linux-image-amd64"
    assert Debian12.default_mirror == "http://deb.debian.org/debian"
    assert "xfsprogs" in Debian12.packages("xfs") and "python3" in Debian12.packages("ext4")
    assert Debian12.sources(None)[0] == "deb http://deb.debian.org/debian bookworm main"
    assert Ubuntu2404.sources("http://m/ubuntu")[0] == "deb http://m/ubuntu noble main universe"
    assert Debian12.release_file_url(None) == "http://deb.debian.org/debian/dists/bookworm/InRelease"
    assert not distributions.get("rocky-9").bootstrappable
    assert distributions.get("debian-13").installer == "preseed"


# ----- the tree -----------------------------------------------------------------------------------


def test_tree_layout(tree: Path) -> None:
    assert json.loads((tree / "base.json").read_text()) == {
        "cpus": "2",
        "memory": "2048",
        "disk_size": "4096M",
        "accelerator": "",
        "cpu_model": "max,erms=off,fsrm=off",
        "headless": "true",
    }  # [machine] only: the SSH timeout is each image's installer_timeout, a default in its template
    assert 'disk_size   = "4096M"' in (tree / "base.pkrvars.hcl").read_text()
    for name in INSTALLER_DISTROS:
        stem = f"{name}-amd64"
        template = json.loads((tree / f"{stem}.json").read_text())
        [builder] = template["builders"]
        assert builder["name"] == "qemu" and builder["type"] == "qemu"
        assert builder["iso_checksum"] == "{{user `iso_checksum`}}"
        assert template["variables"]["iso_checksum"] == distributions.get(name).iso_checksum
        assert template["variables"]["iso_checksum"] != "none"
        assert template["variables"]["ssh_timeout"] == "60m"
        assert (tree / f"{stem}.pkr.hcl").is_file()
        assert "required_plugins" not in (tree / f"{stem}.pkr.hcl").read_text()
    assert (tree / "http" / "ubuntu-24.04" / "meta-data").is_file()
    assert "packer build -only=qemu -var-file=base.json" in (tree / "README.txt").read_text()


def test_json_and_hcl_come_from_the_same_settings(tree: Path) -> None:
    for name in INSTALLER_DISTROS:
        stem = f"{name}-amd64"
        [builder] = json.loads((tree / f"{stem}.json").read_text())["builders"]
        hcl = (tree / f"{stem}.pkr.hcl").read_text()
        source = re.search(r'source "qemu" "([^"]+)" \{\n(.*?)\n\}', hcl, re.S)
        assert source.group(1) == stem.replace(".", "_")
        keys = re.findall(r"^  (\w+)\s+=", source.group(2), re.M)
        assert keys == [key for key in builder if key not in ("type", "name")]
        for key in ("output_directory", "vm_name", "boot_wait", "shutdown_command"):
            assert f"{key.ljust(len(max(keys, key=len)))} = {hcl_string(builder[key])}" in hcl
        for key in builder["boot_command"]:
            assert hcl_string(key) in hcl
        assert f'sources = ["source.qemu.{source.group(1)}"]' in hcl


@needs_packer
@pytest.mark.parametrize("fmt", ["json", "hcl"])
def test_packer_validate_syntax(tree: Path, fmt: str) -> None:
    """-syntax-only: a full validate would download the remote checksum files."""
    for name in INSTALLER_DISTROS:
        if fmt == "json":
            argv = ["packer", "validate", "-syntax-only", "-var-file=base.json", f"{name}-amd64.json"]
        else:
            argv = [
                "packer",
                "validate",
                "-syntax-only",
                "-var-file=base.pkrvars.hcl",
                f"{name}-amd64.pkr.hcl",
            ]
        result = subprocess.run(argv, cwd=tree, env=PACKER_ENV, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name} ({fmt}): {result.stdout}{result.stderr}"


@needs_packer
@pytest.mark.parametrize("efi", [False, True], ids=["bios", "efi"])
def test_packer_validate_full_with_local_iso(tmp_path: Path, fake_iso: tuple[Path, str], efi: bool) -> None:
    """With a local ISO and a literal hash, the full validate (every key decoded) runs offline."""
    iso, digest = fake_iso
    for name in INSTALLER_DISTROS:
        out = _render(tmp_path / name, [name], efi=efi, iso=str(iso), iso_checksum=f"sha256:{digest}")
        for argv in (
            ["packer", "validate", "-var-file=base.json", f"{name}-amd64.json"],
            ["packer", "validate", "-var-file=base.pkrvars.hcl", f"{name}-amd64.pkr.hcl"],
        ):
            result = subprocess.run(argv, cwd=out, env=PACKER_ENV, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"{name} {argv[-1]}: {result.stdout}{result.stderr}"
        template = json.loads((out / f"{name}-amd64.json").read_text())
        assert template["variables"]["iso_url"] == str(iso)
        assert template["variables"]["iso_checksum"] == f"sha256:{digest}"
        assert (["-bios", "/usr/share/ovmf/OVMF.fd"] in template["builders"][0]["qemuargs"]) is efi


@needs_packer
def test_packer_validate_catches_a_broken_template(tmp_path: Path, fake_iso: tuple[Path, str]) -> None:
    """The validate checks above can fail: a key Packer 1.6's qemu builder does not know is reported."""
    iso, digest = fake_iso
    out = _render(tmp_path, ["debian-12"], iso=str(iso), iso_checksum=digest)
    broken = json.loads((out / "debian-12-amd64.json").read_text())
    broken["builders"][0]["no_such_key"] = True
    (out / "broken.json").write_text(json.dumps(broken))
    result = subprocess.run(
        ["packer", "validate", "-var-file=base.json", "broken.json"],
        cwd=out,
        env=PACKER_ENV,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "no_such_key" in result.stdout + result.stderr


# ----- answer files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KICKSTART_VERSIONS))
def test_kickstart_passes_ksvalidator(tree: Path, efi_tree: Path, name: str) -> None:
    ksvalidator = Path(sys.executable).with_name("ksvalidator")
    if not ksvalidator.exists():
        pytest.skip("pykickstart is not installed")
    for folder in (tree, efi_tree):
        ks = folder / "http" / name / "ks.cfg"
        result = subprocess.run(
            [ksvalidator, "-v", KICKSTART_VERSIONS[name], ks], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_ksvalidator_rejects_unknown_commands(tree: Path, tmp_path: Path) -> None:
    ksvalidator = Path(sys.executable).with_name("ksvalidator")
    if not ksvalidator.exists():
        pytest.skip("pykickstart is not installed")
    ks = tmp_path / "ks.cfg"
    ks.write_text(_answer(tree, "centos-7").replace("rootpw --lock", "rootpw --lock\nsshkey --username=x y"))
    assert subprocess.run([ksvalidator, "-v", "RHEL7", ks], capture_output=True).returncode != 0


@needs_debconf
@pytest.mark.parametrize("name", PRESEED)
def test_preseed_passes_debconf_checkonly(tree: Path, efi_tree: Path, name: str) -> None:
    for folder in (tree, efi_tree):
        preseed = folder / "http" / name / "preseed.cfg"
        result = subprocess.run(
            ["debconf-set-selections", "--checkonly", preseed], capture_output=True, text=True
        )
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("name", AUTOINSTALL)
def test_autoinstall_user_data_has_what_subiquity_requires(tree: Path, efi_tree: Path, name: str) -> None:
    for folder, efi in ((tree, False), (efi_tree, True)):
        text = (folder / "http" / name / "user-data").read_text()
        assert text.startswith("#cloud-config\n")
        data = yaml.safe_load(text)["autoinstall"]
        assert data["version"] == 1
        assert data["identity"]["username"] == "packer"
        assert data["identity"]["password"].startswith("$6$")
        assert data["ssh"]["install-server"] is True and data["ssh"]["allow-pw"] is False
        assert data["ssh"]["authorized-keys"][0].startswith("ssh-ed25519 ")
        assert {"python3", "sudo", "openssh-server"} <= set(data["packages"])
        config = data["storage"]["config"]
        ids = {action["id"]: action for action in config}
        assert ids["disk0"]["ptable"] == "gpt"
        for action in config:
            assert action["type"] in ("disk", "partition", "format", "mount")
            assert set(action) >= {"id", "type"}
            if action["type"] in ("partition",):
                assert action["device"] in ids
            if action["type"] == "format":
                assert action["volume"] in ids
            if action["type"] == "mount":
                assert action["device"] in ids
        assert ("part-esp" in ids) is efi and ("part-bios" in ids) is not efi
        assert (folder / "http" / name / "meta-data").read_text().startswith("instance-id:")


# What subiquity's autoinstall-schema.json allows, per release, read from github.com/canonical/subiquity
# (AGPL-3.0, so the schema files are not copied here; these are the constraints that matter for our
# user-data). 22.04: tags 22.04.2 (a80a0bd1, the GA ISO), 22.07.2 (6afbd211, the jammy branch) and the
# server/jammy head (d2fe66f1) share these top-level keys and have no `source`; commit caff5f7d (main,
# 2022-04-26, until 566f32b0 on 2022-08-03) required `search_drivers` inside `source`. 24.04: tags
# 24.04.1 (74c37fe0) and 24.04.4.1 (62f93c2c); since 24.04 unknown top-level keys are a fatal error.
# In all of them: identity requires username, hostname, password and allows only those and realname;
# keyboard requires layout (layout, variant, toggle only); refresh-installer allows update and channel;
# version is 1.
_SUBIQUITY_2204_KEYS = {
    "apt",
    "debconf-selections",
    "drivers",
    "early-commands",
    "error-commands",
    "identity",
    "kernel",
    "keyboard",
    "late-commands",
    "locale",
    "network",
    "packages",
    "proxy",
    "refresh-installer",
    "reporting",
    "shutdown",
    "snaps",
    "ssh",
    "storage",
    "timezone",
    "ubuntu-advantage",
    "updates",
    "user-data",
    "version",
}
SUBIQUITY_TOP_LEVEL_KEYS = {
    "ubuntu-22.04": _SUBIQUITY_2204_KEYS,
    "ubuntu-24.04": _SUBIQUITY_2204_KEYS
    | {"active-directory", "codecs", "interactive-sections", "oem", "source", "ubuntu-pro"},
}
SUBIQUITY_REFS = {
    "ubuntu-22.04": ["22.04.2", "22.07.2", "d2fe66f1"],
    "ubuntu-24.04": ["24.04.1", "24.04.4.1"],
}


@pytest.mark.parametrize("name", AUTOINSTALL)
def test_autoinstall_user_data_is_valid_for_the_isos_subiquity(tree: Path, efi_tree: Path, name: str) -> None:
    for folder in (tree, efi_tree):
        data = yaml.safe_load((folder / "http" / name / "user-data").read_text())["autoinstall"]
        assert set(data) <= SUBIQUITY_TOP_LEVEL_KEYS[name], set(data) - SUBIQUITY_TOP_LEVEL_KEYS[name]
        assert data["version"] == 1
        assert (
            {"username", "hostname", "password"}
            <= set(data["identity"])
            <= {"realname", "username", "hostname", "password"}
        )
        assert all(isinstance(value, str) for value in data["identity"].values())
        assert "layout" in data["keyboard"] and set(data["keyboard"]) <= {"layout", "variant", "toggle"}
        assert set(data["refresh-installer"]) <= {"update", "channel"}
        assert set(data["ssh"]) <= {"install-server", "authorized-keys", "allow-pw"}
        assert all(
            isinstance(item, (str, list)) for key in ("early-commands", "late-commands") for item in data[key]
        )
        assert all(isinstance(package, str) for package in data["packages"])
        if "source" in data:  # valid also for the snapshot that required search_drivers
            assert set(data["source"]) <= {"id", "search_drivers"}
            assert isinstance(data["source"]["search_drivers"], bool) and isinstance(
                data["source"]["id"], str
            )
    assert ("source" in data) is (name == "ubuntu-24.04")  # 22.04's subiquity would ignore it


@pytest.mark.parametrize("name", AUTOINSTALL)
def test_autoinstall_user_data_against_subiquity_schema_files(tree: Path, name: str) -> None:
    """The full schema check, against a local clone of subiquity (not shipped: AGPL-3.0)."""
    checkout = os.environ.get("STAGE4_SUBIQUITY_CHECKOUT")
    jsonschema = pytest.importorskip(
        "jsonschema", reason="pip install jsonschema to check against subiquity's schema"
    )
    if not checkout:
        pytest.skip("set STAGE4_SUBIQUITY_CHECKOUT to a git clone of github.com/canonical/subiquity")
    data = yaml.safe_load((tree / "http" / name / "user-data").read_text())["autoinstall"]
    for ref in SUBIQUITY_REFS[name]:
        schema = json.loads(
            subprocess.run(
                ["git", "-C", checkout, "show", f"{ref}:autoinstall-schema.json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        errors = [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(data)]
        assert not errors, (ref, errors)
        assert set(data) <= set(schema["properties"]), (ref, set(data) - set(schema["properties"]))


# ----- golden partitioning ------------------------------------------------------------------------


def test_no_default_identifier_leaks(tree: Path, efi_tree: Path) -> None:
    for folder in (tree, efi_tree):
        for path in folder.rglob("*"):
            if path.is_file() and "secrets" not in path.parts:
                assert "SLX_SYS" not in path.read_text(), path


@pytest.mark.parametrize("name", PRESEED)
def test_preseed_partitioning(tree: Path, efi_tree: Path, name: str) -> None:
    bios = _answer(tree, name)
    assert "d-i partman-partitioning/choose_label select gpt" in bios
    assert "d-i partman-partitioning/default_label string gpt" in bios
    assert re.search(
        r"1 1 1 free\s+\\\s+\$iflabel\{ gpt \}\s+\\\s+\$reusemethod\{ \}\s+\\\s+method\{ biosgrub \}", bios
    )
    assert re.search(r"1000 10000 -1 ext4\s+\\\s+method\{ format \} format\{ \}", bios)
    assert "filesystem{ ext4 }" in bios and "label{ system }" in bios and "mountpoint{ / }" in bios
    # partman cannot name a GPT partition: the late_command does, on the root partition (2).
    assert (
        "in-target sgdisk --change-name=2:system /dev/vda || in-target sfdisk --part-label /dev/vda 2 system"
        in bios
    )
    assert "gdisk" in re.search(r"^d-i pkgsel/include string (.*)$", bios, re.M).group(1).split()
    assert "method{ efi }" not in bios and "non_efi_system" not in bios
    efi = _answer(efi_tree, name)
    assert re.search(
        r"538 538 1075 free\s+\\\s+\$iflabel\{ gpt \}\s+\\\s+\$reusemethod\{ \}\s+\\\s+method\{ efi \}", efi
    )
    assert "method{ biosgrub }" not in efi
    assert "d-i partman-efi/non_efi_system boolean true" in efi
    assert "d-i grub-installer/force-efi-extra-removable boolean true" in efi
    assert "filesystem{ xfs }" in efi and "label{ system }" in efi
    assert "--change-name=2:system" in efi


@pytest.mark.parametrize("name", list(KICKSTART_VERSIONS))
def test_kickstart_partitioning(tree: Path, efi_tree: Path, name: str) -> None:
    bios = _answer(tree, name)
    assert "part biosboot --onpart=vda1 --fstype=biosboot" in bios
    assert "part / --onpart=vda2 --fstype=ext4 --label=system" in bios
    pre = bios.split("%pre --erroronfail", 1)[1].split("%end", 1)[0]
    assert "mklabel gpt" in pre
    assert "mkpart BIOSBOOT 1MiB 2MiB set 1 bios_grub on" in pre
    assert "mkpart system ext4 2MiB 100%" in pre
    post = bios.split("%post", 1)[1]
    assert 'lsblk -n -o PARTLABEL /dev/vda2)" != "system"' in post
    assert "sfdisk --part-label /dev/vda 2 system" in post
    assert "clearpart" not in bios and "autopart" not in bios
    efi = _answer(efi_tree, name)
    assert "part /boot/efi --onpart=vda1 --fstype=efi" in efi
    assert "part / --onpart=vda2 --fstype=xfs --label=system" in efi
    assert "mkpart ESP fat32 1MiB 601MiB set 1 boot on" in efi and "bios_grub" not in efi


@pytest.mark.parametrize("name", AUTOINSTALL)
def test_autoinstall_partitioning(tree: Path, efi_tree: Path, name: str) -> None:
    for folder, fs in ((tree, "ext4"), (efi_tree, "xfs")):
        data = yaml.safe_load(_answer(folder, name))["autoinstall"]
        ids = {action["id"]: action for action in data["storage"]["config"]}
        root = ids["part-root"]
        assert root["number"] == 2 and root["size"] == -1
        assert ids["fs-root"] == {
            "id": "fs-root",
            "type": "format",
            "volume": "part-root",
            "fstype": fs,
            "label": ID,
        }
        assert ids["mnt-root"]["path"] == "/"
        assert root.get("partition_name", ID) == ID
        assert ("partition_name" in root) is (name == "ubuntu-24.04")
        assert (
            data["late-commands"][0]
            == "sgdisk --change-name=2:system /dev/vda || sfdisk --part-label /dev/vda 2 system"
        )
    bios = {a["id"]: a for a in yaml.safe_load(_answer(tree, name))["autoinstall"]["storage"]["config"]}
    assert bios["part-bios"]["flag"] == "bios_grub" and bios["disk0"]["grub_device"] is True


def test_unsupported_filesystem_is_refused(tmp_path: Path) -> None:
    # the config model refuses it (the CLI turns that into one line, see test_render_cli_* below)
    with pytest.raises(ValidationError, match="the rocky-9 installer cannot create it; use one of ext4, xfs"):
        _render(tmp_path, ["rocky-9"], filesystem="btrfs")
    # Every target is checked before anything is written: a good one before the refused one leaves nothing.
    result = _stage4("render", "debian-12", "rocky-9", "--filesystem", "btrfs", "-o", "out", cwd=tmp_path)
    assert result.returncode == 2 and "rocky-9: filesystem = 'btrfs'" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    _render(tmp_path, ["debian-12"], filesystem="btrfs")
    assert "in-target btrfs filesystem label / system" in _answer(tmp_path, "debian-12")


def test_extra_packages_and_mirror(tmp_path: Path) -> None:
    targets = [
        RenderTarget(ImageConfig(distribution=name, identifier=ID, packages=("htop",), mirror=mirror))
        for name, mirror in (
            ("debian-12", "https://mirror.example/debian"),
            ("ubuntu-24.04", "http://m.example/ubuntu"),
            ("rocky-9", "http://m.example/rocky/9/BaseOS/x86_64/os"),
        )
    ]
    render_tree(tmp_path, targets, MachineConfig(), Runner())
    preseed = _answer(tmp_path, "debian-12")
    assert "d-i mirror/protocol string https" in preseed
    assert "d-i mirror/https/hostname string mirror.example" in preseed
    assert "htop" in re.search(r"^d-i pkgsel/include string (.*)$", preseed, re.M).group(1)
    data = yaml.safe_load(_answer(tmp_path, "ubuntu-24.04"))["autoinstall"]
    assert data["apt"]["primary"][0]["uri"] == "http://m.example/ubuntu" and "htop" in data["packages"]
    ks = _answer(tmp_path, "rocky-9")
    assert "url --url=http://m.example/rocky/9/BaseOS/x86_64/os" in ks and "\ncdrom\n" not in ks
    assert "\nhtop\n" in ks


# ----- credentials --------------------------------------------------------------------------------


def test_sha512_crypt_matches_openssl() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    for password, salt in (("packer", "slxpacker"), ("x" * 70, "abcdefghijklmnop"), ("pässwörd", "S.l/t")):
        expected = (
            subprocess.run(
                ["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                input=password.encode(),
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .strip()
        )
        assert credentials.sha512_crypt(password, salt) == expected


def test_credentials_are_per_build(tmp_path: Path) -> None:
    first = _render(tmp_path / "a", ["debian-12", "rocky-9"])
    second = _render(tmp_path / "b", ["debian-12"])
    secrets = first / "secrets"
    assert oct(secrets.stat().st_mode & 0o777) == "0o700"
    for name in ("build_key", "build-password"):
        assert oct((secrets / name).stat().st_mode & 0o777) == "0o600"
    password = (secrets / "build-password").read_text().strip()
    assert len(password) >= 24
    key = (secrets / "build_key.pub").read_text().strip()
    for text in (_answer(first, "debian-12"), _answer(first, "rocky-9")):
        assert password not in text and key in text
        password_hash = re.search(r"\$6\$[^$]+\$[./0-9A-Za-z]{86}", text).group(0)
        assert credentials.sha512_crypt(password, password_hash.split("$")[2]) == password_hash
    assert (second / "secrets" / "build_key.pub").read_text() != (secrets / "build_key.pub").read_text()
    assert _answer(second, "debian-12") != _answer(first, "debian-12")


# ----- ISO and checksum ---------------------------------------------------------------------------


def test_resolve_iso_forms(tmp_path: Path, fake_iso: tuple[Path, str]) -> None:
    iso, digest = fake_iso
    dist = distributions.get("rocky-9")
    assert resolve_iso(dist, None, None) == (dist.iso_url, dist.iso_checksum)
    assert resolve_iso(dist, str(iso), digest.upper()) == (str(iso), f"sha256:{digest}")
    gnu = tmp_path / "SHA256SUMS"
    gnu.write_text(f"{'0' * 64}  other.iso\n{digest} *{iso.name}\n")
    assert resolve_iso(dist, str(iso), str(gnu)) == (str(iso), f"sha256:{digest}")
    bsd = tmp_path / "CHECKSUM"
    bsd.write_text(f"# comment\nSHA256 ({iso.name}) = {digest}\n")
    assert resolve_iso(dist, str(iso), f"file:{bsd}") == (str(iso), f"sha256:{digest}")
    assert checksum_from_file(bsd, iso.name) == f"sha256:{digest}"
    remote = "file:https://example.org/SHA256SUMS"
    assert resolve_iso(dist, "https://example.org/x.iso", remote) == ("https://example.org/x.iso", remote)
    for bad, message in (
        ((str(iso), None), "give the checksum"),
        ((str(iso), "none"), "not accepted"),
        ((None, "none"), "not accepted"),
        ((str(iso), "sha256:" + "0" * 64), "checksum mismatch"),
        ((str(iso), "sha256:abc"), "not valid"),
        ((str(tmp_path / "missing.iso"), digest), "does not exist"),
        ((str(iso), str(tmp_path / "nosums")), "does not exist"),
    ):
        with pytest.raises(InputError, match=message):
            resolve_iso(dist, *bad)
    gnu.write_text(f"{'0' * 64}  other.iso\n")
    with pytest.raises(InputError, match="no entry for"):
        resolve_iso(dist, str(iso), str(gnu))


def test_hcl_string_escapes() -> None:
    assert hcl_string('a"b\\c${x}%{y}\n') == '"a\\"b\\\\c$${x}%%{y}\\n"'
    assert hcl_string("<wait>{{ .HTTPIP }}") == '"<wait>{{ .HTTPIP }}"'


# ----- the CLI ------------------------------------------------------------------------------------


def _stage4(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stage4", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_render(tmp_path: Path, fake_iso: tuple[Path, str]) -> None:
    iso, digest = fake_iso
    (tmp_path / "stage4.toml").write_text(
        '[machine]\ncpus = 3\nmemory = "1G"\n\n'
        '[images.lab]\ndistribution = "ubuntu-16.04"\nidentifier = "LAB_SYS"\n'
    )
    result = _stage4(
        "render", "lab", "debian-12", "-o", "out", "--iso-checksum", "sha256:" + digest, cwd=tmp_path
    )
    assert result.returncode == 2 and "exactly one DISTRO" in result.stderr
    result = _stage4("render", "lab", "debian-12", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert json.loads((out / "base.json").read_text())["cpus"] == "3"
    assert json.loads((out / "base.json").read_text())["memory"] == "1024"
    assert "label{ LAB_SYS }" in (out / "http" / "ubuntu-16.04" / "preseed.cfg").read_text()
    assert "label{ SLX_SYS }" in (out / "http" / "debian-12" / "preseed.cfg").read_text()
    assert (out / "ubuntu-16.04-amd64.json").is_file() and (out / "debian-12-amd64.pkr.hcl").is_file()

    result = _stage4(
        "render",
        "rocky-9",
        "-o",
        "iso",
        "--iso",
        str(iso),
        "--iso-checksum",
        "sha256:" + "1" * 64,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "checksum mismatch" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "iso" / "rocky-9-amd64.json").exists()
    result = _stage4("render", "rocky-9", "-o", "iso", "--iso", str(iso), cwd=tmp_path)
    assert result.returncode == 2 and "give the checksum" in result.stderr
    result = _stage4("render", "rocky-9", "-o", "iso", "--filesystem", "btrfs", cwd=tmp_path)
    assert result.returncode == 2 and "btrfs" in result.stderr
    result = _stage4(
        "render", "debian-12", "-o", "iso", "--identifier", "much-too-long-for-ext4", cwd=tmp_path
    )
    assert result.returncode == 2 and "identifier" in result.stderr
    result = _stage4("render", "nosuch", "-o", "iso", cwd=tmp_path)
    assert result.returncode == 2 and "neither an image" in result.stderr


def _rendered_settings(out: Path, name: str) -> dict[str, object]:
    """What Packer would run, read back from both the JSON and the HCL2 template (they must agree)."""
    stem = f"{name}-amd64"
    template = json.loads((out / f"{stem}.json").read_text())
    hcl = (out / f"{stem}.pkr.hcl").read_text()
    hcl_defaults = dict(re.findall(r'variable "(\w+)" \{\n  type\s+= \w+\n  default\s+= "([^"]*)"', hcl))
    variables = template["variables"]
    for key in ("iso_url", "iso_checksum", "ssh_timeout"):
        assert hcl_defaults[key] == variables[key], key
    [builder] = template["builders"]
    efi = ["-bios", "/usr/share/ovmf/OVMF.fd"] in builder["qemuargs"]
    assert efi == ('"/usr/share/ovmf/OVMF.fd"' in hcl)
    return {
        "iso_url": variables["iso_url"],
        "iso_checksum": variables["iso_checksum"],
        "ssh_timeout": variables["ssh_timeout"],
        "efi": efi,
        "boot_command": builder["boot_command"],
        "answer": _answer(out, name),
    }


def test_cli_render_takes_every_setting_of_the_image(tmp_path: Path, fake_iso: tuple[Path, str]) -> None:
    """An image's efi, iso, iso_checksum and installer_timeout reach the templates; options replace them."""
    iso, digest = fake_iso
    other = tmp_path / "other.iso"
    other.write_bytes(b"another installer")
    other_digest = hashlib.sha256(other.read_bytes()).hexdigest()
    (tmp_path / "stage4.toml").write_text(
        f'[images.lab]\ndistribution = "rocky-9"\nidentifier = "system"\nfilesystem = "xfs"\nefi = true\n'
        f'iso = "{iso}"\niso_checksum = "sha256:{digest}"\ninstaller_timeout = "90m"\n'
    )
    result = _stage4("render", "lab", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = _rendered_settings(tmp_path / "out", "rocky-9")
    http_url = "http://{{ .HTTPIP }}:{{ .HTTPPort }}/rocky-9"
    assert got["iso_url"] == str(iso) and got["iso_checksum"] == f"sha256:{digest}"
    assert got["ssh_timeout"] == "90m" and got["efi"]
    assert got["boot_command"] == distributions.get("rocky-9").boot_keys(True, http_url)
    assert "--fstype=efi" in got["answer"] and "--label=system" in got["answer"]

    result = _stage4(
        "render",
        "lab",
        "-o",
        "out2",
        "--bios",
        "--ssh-timeout",
        "2h",
        "--iso",
        str(other),
        "--iso-checksum",
        other_digest,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    got = _rendered_settings(tmp_path / "out2", "rocky-9")
    assert got["iso_url"] == str(other) and got["iso_checksum"] == f"sha256:{other_digest}"
    assert got["ssh_timeout"] == "2h" and not got["efi"]
    assert got["boot_command"] == distributions.get("rocky-9").boot_keys(False, http_url)
    assert "--fstype=efi" not in got["answer"] and "biosboot" in got["answer"]

    # An ISO given on the command line does not inherit the checksum of the image's own ISO.
    result = _stage4("render", "lab", "-o", "out3", "--iso", str(other), cwd=tmp_path)
    assert result.returncode == 2 and "give the checksum" in result.stderr
