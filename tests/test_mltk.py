"""mltk modules, the fast part: module.conf reading (with bash), dependency order, bad input, and the
driver that runs a module's functions, run for real on the host (the image builds: test_mltk_image.py)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from stage4 import config
from stage4.errors import ConfigError
from stage4.layers import identities
from stage4.mltk import modules, plan
from stage4.mltk.plan import DRIVER, git_source, install_vars
from stage4.runner import Runner

FIXTURE = Path(__file__).parent / "fixtures/mltk"


def write_module(tree: Path, name: str, conf: str, build: str = "", **extra: str) -> Path:
    folder = tree / "core/modules" / name
    folder.mkdir(parents=True)
    (folder / "module.conf").write_text(conf)
    (folder / "module.build").write_text(build or "build() {\n\t:\n}\n")
    for suffix, text in extra.items():
        (folder / f"module.conf.{suffix.replace('_', '.')}").write_text(text)
    return folder


def test_sys_versions_are_mltks_names() -> None:
    assert modules.sys_versions("debian-12") == ["debian.12", "debian"]
    assert modules.sys_versions("ubuntu-22.04") == ["ubuntu.22.04", "ubuntu.22", "ubuntu"]
    assert modules.sys_versions("centos-7") == ["centos.7", "centos"]


def test_fixture_modules_in_dependency_order_with_distro_config() -> None:
    order = modules.ordered(FIXTURE, ["stage4-greeter"], ["debian.12", "debian"], Runner(), "test")
    assert [m.name for m in order] == ["stage4-hello", "stage4-greeter"]
    hello, greeter = order
    assert hello.words("REQUIRED_BINARIES") == ["stage4-mltk-hello"]
    assert hello.packages("REQUIRED_INSTALLED_PACKAGES") == ["gcc", "libc6-dev"]
    assert hello.conf_file == "module.conf.debian"
    assert greeter.packages("REQUIRED_CONTENT_PACKAGES") == ["tree"]
    ubuntu = modules.ordered(FIXTURE, ["stage4-greeter"], modules.sys_versions("ubuntu-22.04"), Runner(), "t")
    assert ubuntu[1].packages("REQUIRED_CONTENT_PACKAGES") == ["tree", "ubuntu-only-package"]
    assert ubuntu[0].packages("REQUIRED_INSTALLED_PACKAGES") == []


def test_most_specific_distro_config_wins(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "m",
        'REQUIRED_BINARIES="a"\n',
        debian='REQUIRED_CONTENT_PACKAGES="generic"\n',
        debian_12='REQUIRED_CONTENT_PACKAGES="twelve @optional"\n',
    )
    (module,) = modules.ordered(tmp_path, ["m"], modules.sys_versions("debian-12"), Runner(), "t")
    assert module.conf_file == "module.conf.debian.12"
    assert module.words("REQUIRED_CONTENT_PACKAGES") == ["twelve", "@optional"]
    assert module.packages("REQUIRED_CONTENT_PACKAGES") == ["twelve"]
    (module,) = modules.ordered(tmp_path, ["m"], modules.sys_versions("debian-13"), Runner(), "t")
    assert module.packages("REQUIRED_CONTENT_PACKAGES") == ["generic"]


def test_dependencies_come_once_and_first(tmp_path: Path) -> None:
    write_module(tmp_path, "base", "")
    write_module(tmp_path, "left", 'REQUIRED_MODULES="base"\n')
    write_module(tmp_path, "right", 'REQUIRED_MODULES="base left"\n')
    order = modules.ordered(tmp_path, ["right", "left"], ["debian"], Runner(), "t")
    assert [m.name for m in order] == ["base", "left", "right"]


def test_module_problems_name_the_module(tmp_path: Path) -> None:
    write_module(tmp_path, "a", 'REQUIRED_MODULES="b"\n')
    write_module(tmp_path, "b", 'REQUIRED_MODULES="c"\n')
    write_module(tmp_path, "c", 'REQUIRED_MODULES="a"\n')
    write_module(tmp_path, "d", 'REQUIRED_MODULES="nosuch"\n')
    (tmp_path / "core/modules/noconf").mkdir()
    runner = Runner()
    with pytest.raises(modules.ModuleProblem, match=r"dependency cycle: a -> b -> c -> a"):
        modules.ordered(tmp_path, ["a"], ["debian"], runner, "t")
    with pytest.raises(modules.ModuleProblem, match=r"no module 'nosuch' .*\(required by module 'd'\)"):
        modules.ordered(tmp_path, ["d"], ["debian"], runner, "t")
    with pytest.raises(
        modules.ModuleProblem, match=r"module 'noconf' \(core/modules/noconf\) has no module.conf"
    ):
        modules.ordered(tmp_path, ["noconf"], ["debian"], runner, "t")


def test_modules_found_through_the_stage4_target() -> None:
    assert modules.find(FIXTURE, "stage4-hello") == (FIXTURE / "core/modules/stage4-hello").resolve()


def test_git_entries() -> None:
    assert git_source("https://example.org/x/dmidecode.git")[0] == "dmidecode"
    assert git_source("https://example.org/x/dmidecode.git")[1].ref == "HEAD"
    assert git_source("https://example.org/y.git|stable")[1].ref == "stable"
    assert git_source("https://example.org/y||0123abc")[1].ref == "0123abc"


def mltk_config(tmp_path: Path, mltk: dict) -> config.Config:
    return config.from_dict({"images": {"img": {"mltk": mltk}}}, str(tmp_path / "stage4.toml"))


def test_config_bad_input_is_one_line(tmp_path: Path) -> None:
    cfg = mltk_config(tmp_path, {"source": {"path": str(FIXTURE)}, "modules": ["stage4-greeter"]})
    assert cfg.images["img"].layered and cfg.images["img"].mltk.modules == ("stage4-greeter",)
    missing = tmp_path / "no"
    cases = [  # (mltk table, the key named, the rest of the line after the key)
        (
            {"source": {"path": str(FIXTURE)}, "modules": []},
            "images.img.mltk.modules",
            " = []: name at least one module",
        ),
        (
            {"source": {"path": str(FIXTURE)}, "modules": ["../x"]},
            "images.img.mltk.modules",
            " = ['../x']: '../x' is not an mltk module name",
        ),
        ({"modules": ["a"]}, "images.img.mltk.source", ": required key is missing"),
        (
            {"source": {"path": str(missing)}, "modules": ["a"]},
            "images.img.mltk.source.path",
            f" = '{missing}': no such directory {missing}",
        ),
        (
            {"source": {"path": str(FIXTURE)}, "modules": ["a"], "distro": "Debian 12"},
            "images.img.mltk.distro",
            " = 'Debian 12': expected a name such as 'debian-12' or 'ubuntu-22.04'",
        ),
        (
            {"source": {"path": str(FIXTURE)}, "modules": ["a"], "colour": 1},
            "images.img.mltk.colour",
            " = 1: unknown key",
        ),
    ]
    for mltk, key, rest in cases:
        expected = f"{tmp_path / 'stage4.toml'}: {key}{rest}"
        with pytest.raises(ConfigError, match="^" + re.escape(expected) + "$") as caught:
            mltk_config(tmp_path, mltk)
        assert caught.value.key == key, (mltk, str(caught.value))
        assert "\n" not in str(caught.value)


def run_driver(
    module_dir: Path, work: Path, action: str = "build", **extra: str
) -> subprocess.CompletedProcess:
    name = module_dir.name
    env = {
        **extra,
        **os.environ,
        "MODULE": name,
        "MODULE_DIR": str(module_dir),
        "MODULE_WORK_DIR": str(work / name),
        "MODULE_BUILD_DIR": str(work / name / "build"),
        "ROOT_DIR": str(module_dir.parent.parent.parent),
        "SYS_VERSIONS": "debian.12 debian",
        "STAGE4_MLTK_GIT": str(work / "git"),
        "STAGE4_MLTK_OUT": str(work / "out"),
    }
    return subprocess.run(["bash", DRIVER, action], env=env, capture_output=True, text=True, cwd=work)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc on the host (./install.sh)")
def test_driver_builds_and_collects_only_what_is_required(tmp_path: Path) -> None:
    for name in ("stage4-hello", "stage4-greeter"):
        done = run_driver(FIXTURE / "core/modules" / name, tmp_path)
        assert done.returncode == 0, done.stderr + done.stdout
    with tarfile.open(tmp_path / "out/stage4-hello.tar") as archive:
        names = set(archive.getnames())
    assert {
        "files/usr/local/bin/stage4-mltk-hello",
        "files/usr/local/share/stage4-mltk-hello/greeting",
    } <= names
    assert "files/usr/local/share/stage4-mltk-hello/leftover" not in names
    assert "module/module.build" in names
    with tarfile.open(tmp_path / "out/stage4-greeter.tar") as archive:
        link = archive.getmember(
            "module/data/etc/systemd/system/multi-user.target.wants/stage4-greeter.service"
        )
    assert link.issym() and link.linkname == "../stage4-greeter.service"


def test_driver_failure_names_module_and_function(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    broken = write_module(
        tree,
        "broken",
        'REQUIRED_BINARIES="nothing"\n',
        'build() {\n\techo "compiling the thing"\n\tfalse || perror "Could not compile the thing"\n}\n',
    )
    failed = run_driver(broken, tmp_path)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()
    assert last[0] == "mltk module broken: build failed (exit 1); its last lines:", failed.stderr
    assert "compiling the thing" in failed.stderr and "Could not compile the thing" in failed.stderr
    # perror in a command substitution stops the driver too (mltk's qnd_exit), and a missing binary is named.
    nested = write_module(
        tree, "nested", "", 'fetch_source() {\n\tx=$(perror "inner failure")\n\techo "went on"\n}\n'
    )
    failed = run_driver(nested, tmp_path)
    assert "mltk module nested: fetch_source failed" in failed.stderr and "went on" not in failed.stdout
    missing = write_module(tree, "missing", 'REQUIRED_BINARIES="stage4-nowhere"\n')
    failed = run_driver(missing, tmp_path)
    assert "mltk module missing: collect failed" in failed.stderr
    assert "stage4-nowhere is neither in the build tree" in failed.stderr


def test_identities_follow_the_mltk_config_and_content(tmp_path: Path) -> None:
    tree = tmp_path / "mltk"
    shutil.copytree(FIXTURE, tree, symlinks=True)

    def dev_id(mltk: dict | None) -> str:
        image = mltk_config(tmp_path, mltk).images["img"] if mltk else config.ImageConfig(prod={})
        return identities.dev_identity(image, "base-id", "6.1.0-1-amd64")

    first = dev_id({"source": {"path": str(tree)}, "modules": ["stage4-greeter"]})
    assert first == dev_id({"source": {"path": str(tree)}, "modules": ["stage4-greeter"]})
    assert first != dev_id(None)
    assert first != dev_id({"source": {"path": str(tree)}, "modules": ["stage4-hello"]})
    assert first != dev_id(
        {"source": {"path": str(tree)}, "modules": ["stage4-greeter"], "distro": "ubuntu-22.04"}
    )
    (tree / "core/modules/stage4-hello/hello.c").write_text("int main(void) { return 1; }\n")
    changed = dev_id({"source": {"path": str(tree)}, "modules": ["stage4-greeter"]})
    assert changed != first
    prod = [identities.prod_identity(config.ImageConfig(prod={}), "base-id", dev) for dev in (first, changed)]
    assert prod[0] != prod[1]


def test_driver_gives_the_release_and_system_variables(tmp_path: Path) -> None:
    shown = "$SYS_DISTRIBUTION $SYS_VERSION $SYS_CODENAME $PACKET_MANAGER $PACKET_HANDLER $ARCH_LIB_DIR"
    module = write_module(tmp_path / "tree", "release", "", f'build() {{\n\techo "release: {shown}"\n}}\n')
    env = {"SYS_DISTRIBUTION": "debian", "SYS_VERSION": "12", "SYS_CODENAME": "bookworm"}
    done = run_driver(module, tmp_path, **env)
    assert done.returncode == 0, done.stderr
    libc = next(
        d for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu") if Path(d, "libc.so.6").exists()
    )
    assert f"release: debian 12 bookworm apt dpkg {libc.removeprefix('/usr')}" in done.stdout.splitlines()
    # The prod role gets the dev run's release facts; the roles pass them to the driver in both layers.
    facts = {"distribution": "debian", "version": "12", "codename": "bookworm"}
    results = {"modules": ["m"], "content_packages": [], "sys_versions": "debian", "sys": facts, "files": []}
    results |= {"ash": False, "units": []}
    assert install_vars(results, tmp_path)["sys"] == facts  # type: ignore[arg-type]
    roles = Path(DRIVER).parent.parent / "provisioning/ansible/roles"
    for task in ("stage4_mltk_build/tasks/run.yml", "stage4_mltk_install/tasks/install.yml"):
        text = (roles / task).read_text()
        for key in ("distribution", "version", "codename"):
            assert f'SYS_{key.upper()}: "{{{{ stage4_mltk.sys.{key} }}}}"' in text, task


@pytest.mark.parametrize(
    "conf",
    [
        'REQUIRED_SYSTEM_FILES="/etc/os-release /etc/apt/apt.conf.d"\n',
        # mltk's install mode: what is on the system, in no build tree and no content package.
        'REQUIRED_FILES="/etc/os-release"\nREQUIRED_DIRECTORIES="/etc/apt/apt.conf.d"\n',
    ],
)
def test_driver_collects_system_files_with_their_links(tmp_path: Path, conf: str) -> None:
    if not Path("/etc/os-release").is_symlink():
        pytest.skip("needs /etc/os-release to be a link (as on Debian and Ubuntu)")
    target = Path("/etc/os-release").resolve()
    module = write_module(tmp_path / "tree", "sysfiles", conf)
    done = run_driver(module, tmp_path)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "out/sysfiles.tar") as archive:
        names = set(archive.getnames())
        assert archive.getmember("files/etc/os-release").issym()
    assert "files" + str(target) in names
    assert {f"files/etc/apt/apt.conf.d/{p.name}" for p in Path("/etc/apt/apt.conf.d").iterdir()} <= names
    for key, entry, message in (
        ("REQUIRED_SYSTEM_FILES", "/etc/stage4-nowhere", "is not on this system"),
        (
            "REQUIRED_FILES",
            "/etc/stage4-nowhere",
            "is neither in the build tree, in REQUIRED_CONTENT_PACKAGES nor",
        ),
        (
            "REQUIRED_DIRECTORIES",
            "/etc/stage4-nowhere",
            "is neither in the build tree, in REQUIRED_CONTENT_PACKAGES",
        ),
    ):
        missing = write_module(tmp_path / "tree", f"no-{key.lower()}", f'{key}="{entry}"\n')
        failed = run_driver(missing, tmp_path)
        assert f"mltk module no-{key.lower()}: collect failed" in failed.stderr
        assert f"{key}: {entry} {message}" in failed.stderr, failed.stderr


def test_result_shows_ash_scripts_and_enabled_units(tmp_path: Path) -> None:
    def result(name: str, members: dict[str, bytes | str]) -> Path:
        """A module's result: files (bytes) and symlinks (str: the target) at the given names."""
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w") as archive:
            for member, content in members.items():
                info = tarfile.TarInfo(member)
                if isinstance(content, str):
                    info.type, info.linkname = tarfile.SYMTYPE, content
                    archive.addfile(info)
                else:
                    info.size = len(content)
                    archive.addfile(info, io.BytesIO(content))
        return path

    wants = "etc/systemd/system/sysinit.target.wants/zram-swap.service"
    shipped = result(
        "zram",
        {
            f"module/data/{wants}": "../zram-swap.service",
            "module/data/opt/openslx/scripts/zram": b"#!/bin/ash\n/opt/openslx/bin/timeout 1 x\n",
            "files/usr/lib/systemd/system/multi-user.target.wants/tool.service": "../tool.service",
            "files/usr/lib/systemd/system/tool.service": b"ExecStart=/opt/openslx/sbin/udhcpd -f\n",
            "module/data/opt/openslx/bin/slx-tools": b"#!/bin/bash\n",
        },
    )
    found = plan.shipped(shipped)
    assert (found.units, found.ash) == ({"zram-swap.service", "tool.service"}, True)
    assert (found.named, found.provided) == ({"bin/timeout", "sbin/udhcpd"}, {"bin/slx-tools"})
    # Only what lands in /: not the module's own files (module.build), not other shells.
    other = result(
        "other",
        {
            "module/module.build": b"#!/bin/ash\n/opt/openslx/bin/not-shipped\n",
            "module/data/usr/bin/a": b"#!/bin/bash\n. /opt/openslx/bin/slx-tools\n",
            "files/usr/bin/b": b"#!/bin/ashes\n",
            "module/etc/systemd/system/x.target.wants/not-shipped.service": "../x",
        },
    )
    assert plan.shipped(other) == (set(), False, {"bin/slx-tools"}, set())
    # What prod links: named by one module, shipped by none (slx-tools is shipped by the first).
    staging, out = tmp_path / "staging", tmp_path / "out"
    (out / plan.RESULTS).mkdir(parents=True)
    for path in (shipped, other):
        shutil.copy(path, out / plan.RESULTS / path.name)
    modules = [{"name": "zram"}, {"name": "other"}]
    build = {"modules": modules, "content_packages": [], "sys_versions": "debian", "sys": {}}
    results = plan.extract(out, staging, build, "dev", None)  # type: ignore[arg-type]
    assert results["applets"] == ["bin/timeout", "sbin/udhcpd"]
    assert plan.runtime_packages(results) == ["busybox"]
    assert plan.runtime_packages(results | {"ash": False, "applets": []}) == []


UNITS_SCRIPT = (
    Path(plan.__file__).parents[1] / "provisioning/ansible/roles/stage4_mltk_install/files/mltk-units.sh"
)
KMSG_LINE_MAX = 992  # the kernel's LOG_LINE_MAX (1024 - 32): /dev/kmsg refuses a longer line with EIO


def test_unit_report_fits_the_kernels_log_lines(tmp_path: Path) -> None:
    """bwLehrpool's stage4 target enables dozens of units: its report (the marker's ExecStartPre) goes out
    in several lines, each short enough for /dev/kmsg, and a boot reads them as one report."""
    from stage4.boot import qemu

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # systemctl show -P ActiveState|Result UNIT, as systemd answers for a started oneshot.
    fake = bin_dir / "systemctl"
    fake.write_text('#!/bin/sh\n[ "$3" = ActiveState ] && echo active || echo success\n')
    fake.chmod(0o755)
    units = [f"bwlehrpool-module-number-{n:02d}-with-a-long-name.service" for n in range(40)]
    (tmp_path / "units").write_text(" ".join(units) + "\n")
    kmsg = tmp_path / "kmsg"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["sh", UNITS_SCRIPT, tmp_path / "units", kmsg], check=True, env=env)
    lines = kmsg.read_text().splitlines()
    assert len(lines) > 1 and all(len(line.encode()) < KMSG_LINE_MAX for line in lines), lines
    assert all(line.startswith("<2>STAGE4-MLTK-UNITS ") for line in lines)
    spec = qemu.BootSpec(None, "tcg", 1, 512, tmp_path / "serial.log")
    assert qemu.check_module_units(lines, spec) == dict.fromkeys(units, "active/success")
