"""Config validation: every malformed input gets one line naming the file, the key and the value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stage4 import config
from stage4.errors import ConfigError
from tests.conftest import run_stage4


@pytest.fixture(autouse=True)
def _empty_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stage4 reads ./stage4.toml when no -c is given: these tests must not see one from where pytest
    started."""
    monkeypatch.chdir(tmp_path)


CASES = [
    # (TOML text, expected message after "<file>: ")
    (
        '[images.a]\ndistribution = "debian-99"\n',
        "images.a.distribution = 'debian-99': unknown distribution; known: ",
    ),
    ('[images.a]\nfilesystem = "zfs"\n', "images.a.filesystem = 'zfs': must be one of ext4, btrfs or xfs"),
    (
        '[images.a]\nidentifier = "SLX SYS"\n',
        "images.a.identifier = 'SLX SYS': may contain only letters, digits, '_', '.' and '-' "
        "(no whitespace or '/')",
    ),
    (
        '[images.a]\nidentifier = "SLX_SYSTÈME"\n',
        "images.a.identifier = 'SLX_SYSTÈME': must be ASCII (it is a GPT name and a filesystem label)",
    ),
    (
        '[images.a]\nidentifier = "A_VERY_LONG_LABEL"\n',
        "images.a.identifier = 'A_VERY_LONG_LABEL': longer than the 16 bytes of a ext4 label",
    ),
    ('[images.a]\nfilesystem = "xfs"\nidentifier = "SLX_SYSTEM_1"\n', None),
    (
        '[images.a]\nfilesystem = "xfs"\nidentifier = "SLX_SYSTEM_12"\n',
        "images.a.identifier = 'SLX_SYSTEM_12': longer than the 12 bytes of a xfs label",
    ),
    ('[images.a]\nidentifier = ""\n', "images.a.identifier = '': must not be empty"),
    (
        '[images.a]\nbuilder = "debootstrap"\n',
        "images.a.builder = 'debootstrap': must be one of bootstrap or packer",
    ),
    (
        '[images.a]\npackages = ["vim", "evil;rm -rf /"]\n',
        "images.a.packages.1 = 'evil;rm -rf /': not a package name",
    ),
    (
        '[images.a.prod]\npackages = ["ok", "Bad Name"]\n',
        "images.a.prod.packages.1 = 'Bad Name': not a package name",
    ),
    ('[images.a]\npackages = "vim"\n', "images.a.packages = 'vim': expected a list"),
    (
        '[images.a]\nmirror = "deb.debian.org/debian"\n',
        "images.a.mirror = 'deb.debian.org/debian': expected an http://, https:// or file:// URL",
    ),
    ('[images.a]\ncolour = "blue"\n', "images.a.colour = 'blue': unknown key"),
    ('[machine]\ncpus = "two"\n', "machine.cpus = 'two': expected a whole number"),
    ("[machine]\ncpus = 0\n", "machine.cpus = 0: must be at least 1"),
    ('[machine]\nmemory = "lots"\n', "machine.memory = 'lots': expected a size such as '4G' or '512M'"),
    ('[machine]\ndisk_size = "512M"\n', "machine.disk_size = '512M': at least 1G is needed for a base image"),
    ('[machine]\naccelerator = "hvf"\n', "machine.accelerator = 'hvf': must be one of auto, kvm or tcg"),
    ("[machine]\nspeed = 3\n", "machine.speed = 3: unknown key"),
    (
        "[images.'../etc']\n",
        "images: image name '../etc' is not a simple name "
        "(a letter or digit, then letters, digits, '.', '_', '-'; "
        "at most 64 characters)",
    ),
    ("images = {}\n", "images = {}: no image defined; add an [images.NAME] table"),
    ("[images.a\n", "(file): not valid TOML: "),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_malformed_config_is_named_precisely(tmp_path: Path, text: str, expected: str | None) -> None:
    path = tmp_path / "stage4.toml"
    path.write_text(text, encoding="utf-8")
    if expected is None:
        assert config.load(path).images["a"].identifier == "SLX_SYSTEM_1"
        return
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: {expected}")) as caught:
        config.load(path)
    assert str(caught.value).startswith(f"{path}: {expected}")


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "stage4.toml"
    path.write_text('[images.lab]\nfilesystem = "zfs"\n', encoding="utf-8")
    result = run_stage4("-c", str(path), "build")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"stage4: error: {path}: images.lab.filesystem = 'zfs': must be one of ext4, btrfs or xfs"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "output").exists()


def test_defaults_without_a_config_file(tmp_path: Path) -> None:
    result = run_stage4("config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# from built-in defaults" in result.stdout
    cfg = config.load(None)
    assert cfg.source == "built-in defaults"
    assert list(cfg.images) == ["debian-12"]
    image = cfg.images["debian-12"]
    assert (image.distribution, image.filesystem.value, image.identifier, image.builder.value) == (
        "debian-12",
        "ext4",
        "SLX_SYS",
        "bootstrap",
    )


def test_default_builder_follows_the_distribution() -> None:
    cfg = config.from_dict(
        {"images": {"d": {"distribution": "debian-12"}, "r": {"distribution": "rocky-9"}}}, "t"
    )
    assert cfg.images["d"].builder is config.BuilderKind.bootstrap
    assert cfg.images["r"].builder is config.BuilderKind.packer


def test_sizes_are_binary_units() -> None:
    cfg = config.from_dict({"machine": {"memory": "1536M", "disk_size": "5GiB"}}, "t")
    assert cfg.machine.memory == 1536 << 20
    assert cfg.machine.disk_size == 5 << 30


def test_unknown_image_on_the_command_line(tmp_path: Path) -> None:
    result = run_stage4("build", "nonexistent", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "stage4: error: built-in defaults: images.nonexistent: no such image; defined: debian-12"
    )


def test_unreachable_mirror_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "stage4.toml"
    path.write_text(
        f'[build]\noutput_dir = "{tmp_path}/out"\ncache_dir = "{tmp_path}/cache"\n'
        '[images.lab]\nmirror = "http://127.0.0.1:9/debian"\n',
        encoding="utf-8",
    )
    result = run_stage4("-c", str(path), "build")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"stage4: error: {path}: images.lab.mirror = 'http://127.0.0.1:9/debian': "
        "mirror unreachable (http://127.0.0.1:9/debian/dists/bookworm/InRelease:"
    )
    assert not list((tmp_path / "out").glob("**/*.qcow2"))


def test_readme_config_reference_is_generated_from_the_model() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert config.reference() in readme


def test_ubuntu_without_its_keyring_says_what_is_missing(tmp_path: Path) -> None:
    if Path("/usr/share/keyrings/ubuntu-archive-keyring.gpg").exists():
        pytest.skip("this host has the Ubuntu keyring")
    path = tmp_path / "stage4.toml"
    path.write_text(
        f'[build]\noutput_dir = "{tmp_path}/out"\ncache_dir = "{tmp_path}/cache"\n'
        '[images.noble]\ndistribution = "ubuntu-24.04"\n',
        encoding="utf-8",
    )
    result = run_stage4("-c", str(path), "build", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"stage4: error: {path}: images.noble.distribution = 'ubuntu-24.04': verifying its mirror needs the "
        "keyring /usr/share/keyrings/ubuntu-archive-keyring.gpg, which this host lacks; "
        "install ubuntu-keyring "
        "(from an Ubuntu system; Debian 12 does not package it)"
    )


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            '[images.a]\ndistribution = "rocky-9"\nbuilder = "bootstrap"\n',
            "images.a.builder = 'bootstrap': rocky-9 cannot be bootstrapped; use 'packer'",
        ),
        (
            '[images.a]\ndistribution = "rocky-9"\nbuilder = "packer"\nfilesystem = "btrfs"\n',
            "images.a.filesystem = 'btrfs': the rocky-9 installer cannot create it; use one of ext4, xfs",
        ),
        (
            '[images.a]\ndistribution = "debian-12"\nbuilder = "packer"\niso_checksum = "none"\n',
            "images.a.iso_checksum = 'none': ISO checksums are always verified; give the real one",
        ),
    ],
)
def test_builder_and_installer_settings_are_checked(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "stage4.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: {expected}") + "$") as caught:
        config.load(path)
    assert str(caught.value) == f"{path}: {expected}"
