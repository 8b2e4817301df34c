"""Malformed input through the real `stage4` command: one line naming the file, key or path and the cause.

Every case runs `.venv/bin/stage4` in an empty working directory and checks the exit code (2 for bad input),
that stderr is exactly one `stage4: error:` line without a traceback, and that what it names is there.
Config cases run `build`, which must stop before any build step: nothing is written into the output
directory and the (private) cache stays empty, so the table stays fast.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_stage4

SHA = "a" * 64
# A component that is valid apart from what a case changes.
COMPONENT = '[images.lab.components.tool]\nsource = { git = "https://example.org/tool.git" }\n'


@dataclass
class Case:
    id: str
    toml: str | bytes | None  # the project file ({tmp} is the case's directory); None: no -c option
    args: tuple[str, ...]  # the command after `stage4 [-c FILE]`; {tmp} is replaced
    key: str  # in_file: what follows "<file>: "; else a fragment of the line
    cause: str  # a fragment of the line after the key
    in_file: bool = True  # the line names the project file first
    code: int = 2


def config_case(id: str, toml: str | bytes, key: str, cause: str, command: str = "build") -> Case:
    return Case(id, toml, (command,), key, cause)


def cli_case(id: str, args: tuple[str, ...], key: str, cause: str) -> Case:
    """A bad command-line value; a project file keeps any build that should not start in the case's folder."""
    return Case(id, "", args, key, cause, in_file=False)


CASES = [
    # --- the identifier: every consumer's rules (GPT name, label, by-partlabel link, systemd unit name)
    config_case(
        "identifier-dotdot",
        '[images.lab]\nidentifier = ".."\n',
        "images.lab.identifier = '..'",
        "systemd cannot make a unit name",
    ),
    config_case(
        "identifier-dot", '[images.lab]\nidentifier = "."\n', "images.lab.identifier = '.'", "is not a name"
    ),
    config_case(
        "identifier-leading-dot",
        '[images.lab]\nidentifier = ".sys"\n',
        "images.lab.identifier = '.sys'",
        "must not start with '.'",
    ),
    config_case(
        "identifier-leading-dash",
        '[images.lab]\nidentifier = "-sys"\n',
        "images.lab.identifier = '-sys'",
        "must not start with '-'",
    ),
    config_case(
        "identifier-space",
        '[images.lab]\nidentifier = "SLX SYS"\n',
        "images.lab.identifier = 'SLX SYS'",
        "no whitespace",
    ),
    config_case(
        "identifier-tab",
        '[images.lab]\nidentifier = "SLX\\tSYS"\n',
        "images.lab.identifier = 'SLX\\tSYS'",
        "may contain only letters",
    ),
    config_case(
        "identifier-slash", '[images.lab]\nidentifier = "a/b"\n', "images.lab.identifier = 'a/b'", "'/'"
    ),
    config_case(
        "identifier-empty",
        '[images.lab]\nidentifier = ""\n',
        "images.lab.identifier = ''",
        "must not be empty",
    ),
    config_case(
        "identifier-non-ascii",
        '[images.lab]\nidentifier = "SYSTÈME"\n',
        "images.lab.identifier",
        "must be ASCII",
    ),
    config_case(
        "identifier-gpt-limit",
        f'[images.lab]\nfilesystem = "btrfs"\nidentifier = "{"S" * 37}"\n',
        "images.lab.identifier",
        "36 characters of a GPT partition name",
    ),
    config_case(
        "identifier-ext4-label",
        '[images.lab]\nidentifier = "A_VERY_LONG_LABEL"\n',
        "images.lab.identifier",
        "16 bytes of a ext4 label",
    ),
    config_case(
        "identifier-xfs-label",
        '[images.lab]\nfilesystem = "xfs"\nidentifier = "SLX_SYSTEM_12"\n',
        "images.lab.identifier",
        "12 bytes of a xfs label",
    ),
    # --- the file itself
    config_case("file-not-utf8", b'[images.lab]\nidentifier = "SYST\xc8ME"\n', "(file)", "not UTF-8 text"),
    config_case("file-not-toml", "[images.lab\n", "(file)", "not valid TOML"),
    # --- paths in [build]
    config_case(
        "output-dir-is-a-file",
        '[build]\noutput_dir = "afile"\n',
        "build.output_dir = 'afile'",
        "afile is a file, not a directory",
    ),
    config_case(
        "cache-dir-below-a-file",
        '[build]\ncache_dir = "afile/cache"\n',
        "build.cache_dir = 'afile/cache'",
        "afile is a file, not a directory",
    ),
    # --- sizes and numbers in [machine]
    config_case(
        "disk-size-beyond-qcow2",
        '[machine]\ndisk_size = "999999999T"\n',
        "machine.disk_size = '999999999T'",
        "larger than the 2P a qcow2 image can hold",
    ),
    config_case(
        "disk-size-too-small", '[machine]\ndisk_size = "512M"\n', "machine.disk_size = '512M'", "at least 1G"
    ),
    config_case(
        "disk-size-word",
        '[machine]\ndisk_size = "big"\n',
        "machine.disk_size = 'big'",
        "expected a size such as '4G'",
    ),
    config_case("memory-word", '[machine]\nmemory = "lots"\n', "machine.memory = 'lots'", "expected a size"),
    config_case("cpus-zero", "[machine]\ncpus = 0\n", "machine.cpus = 0", "must be at least 1"),
    config_case("cpus-word", '[machine]\ncpus = "two"\n', "machine.cpus = 'two'", "expected a whole number"),
    config_case(
        "accelerator",
        '[machine]\naccelerator = "hvf"\n',
        "machine.accelerator = 'hvf'",
        "must be one of auto, kvm or tcg",
    ),
    config_case("machine-not-a-table", "machine = 3\n", "machine = 3", "expected a table"),
    # --- pattern fields: each says what it expects
    config_case(
        "artifact-mode",
        COMPONENT + 'artifacts = [{ path = "t", dest = "/usr/bin/t", mode = "999" }]\n',
        "images.lab.components.tool.artifacts.0.mode = '999'",
        "expected an octal file mode",
    ),
    config_case(
        "artifact-mode-number",
        COMPONENT + 'artifacts = [{ path = "t", dest = "/usr/bin/t", mode = 755 }]\n',
        "images.lab.components.tool.artifacts.0.mode = 755",
        "expected a string",
    ),
    config_case(
        "artifact-kind",
        COMPONENT + 'artifacts = [{ path = "t", kind = "binary" }]\n',
        "images.lab.components.tool.artifacts.0.kind = 'binary'",
        "must be 'module' or 'file'",
    ),
    config_case(
        "artifact-file-without-dest",
        COMPONENT + 'artifacts = [{ path = "t" }]\n',
        "images.lab.components.tool.artifacts.0",
        "needs an absolute dest",
    ),
    config_case(
        "installer-timeout",
        '[images.lab]\ninstaller_timeout = "1 hour"\n',
        "images.lab.installer_timeout = '1 hour'",
        "expected a duration such as '90s', '60m' or '2h'",
    ),
    config_case(
        "package-name",
        '[images.lab]\npackages = ["vim", "evil;rm -rf /"]\n',
        "images.lab.packages.1 = 'evil;rm -rf /'",
        "not a package name",
    ),
    config_case(
        "packages-not-a-list",
        '[images.lab]\npackages = "vim"\n',
        "images.lab.packages = 'vim'",
        "expected a list",
    ),
    config_case(
        "component-name",
        '[images.lab.components."my tool"]\nsource = { git = "x" }\n',
        "images.lab.components",
        "component name 'my tool' is not a simple name",
    ),
    config_case("image-name", "[images.'../etc']\n", "images", "image name '../etc' is not a simple name"),
    # --- files and folders the config names, relative to the project file
    config_case(
        "playbook-missing",
        '[images.lab.dev]\nplaybooks = ["site.yml"]\n',
        "images.lab.dev.playbooks.0 = 'site.yml'",
        "no such file {tmp}/site.yml",
    ),
    config_case(
        "playbook-is-a-directory",
        '[images.lab.prod]\nplaybooks = ["adir"]\n',
        "images.lab.prod.playbooks.0 = 'adir'",
        "{tmp}/adir is a directory, not a file",
    ),
    config_case(
        "source-path-missing",
        COMPONENT.replace('git = "https://example.org/tool.git"', 'path = "src"'),
        "images.lab.components.tool.source.path = 'src'",
        "no such directory {tmp}/src",
    ),
    config_case(
        "source-path-is-a-file",
        COMPONENT.replace('git = "https://example.org/tool.git"', 'path = "afile"'),
        "images.lab.components.tool.source.path = 'afile'",
        "is a file, not a directory",
    ),
    config_case(
        "source-tarball-missing",
        COMPONENT.replace('git = "https://example.org/tool.git"', f'tarball = "t.tar.gz", sha256 = "{SHA}"'),
        "images.lab.components.tool.source.tarball = 't.tar.gz'",
        "no such file {tmp}/t.tar.gz",
    ),
    config_case(
        "initramfs-source-missing",
        '[images.lab.initramfs]\nsource = { path = "dracut" }\n',
        "images.lab.initramfs.source.path = 'dracut'",
        "no such directory",
    ),
    config_case(
        "source-two-kinds",
        COMPONENT.replace(
            'git = "https://example.org/tool.git"', 'git = "https://example.org/t.git", path = "adir"'
        ),
        "images.lab.components.tool.source",
        "give exactly one of git, tarball or path",
    ),
    config_case(
        "source-missing",
        '[images.lab.components.tool]\nbuild = ["make"]\n',
        "images.lab.components.tool.source",
        "required key is missing",
    ),
    config_case(
        "sha256",
        COMPONENT.replace(
            'git = "https://example.org/tool.git"', 'tarball = "https://example.org/t.tgz", sha256 = "abc"'
        ),
        "images.lab.components.tool.source.sha256 = 'abc'",
        "expected 64 hexadecimal digits",
    ),
    # --- other image keys
    config_case(
        "unknown-key", '[images.lab]\ncolour = "blue"\n', "images.lab.colour = 'blue'", "unknown key"
    ),
    config_case(
        "distribution",
        '[images.lab]\ndistribution = "debian-99"\n',
        "images.lab.distribution = 'debian-99'",
        "unknown distribution",
    ),
    config_case(
        "builder-for-distribution",
        '[images.lab]\ndistribution = "rocky-9"\nbuilder = "bootstrap"\n',
        "images.lab.builder = 'bootstrap'",
        "rocky-9 cannot be bootstrapped",
    ),
    config_case(
        "mirror",
        '[images.lab]\nmirror = "deb.debian.org/debian"\n',
        "images.lab.mirror = 'deb.debian.org/debian'",
        "expected an http://, https:// or file:// URL",
    ),
    config_case(
        "efi-not-bool", '[images.lab]\nefi = "yes"\n', "images.lab.efi = 'yes'", "expected true or false"
    ),
    config_case("layer-not-a-table", "[images.lab]\ndev = 5\n", "images.lab.dev = 5", "expected a table"),
    config_case("no-images", "images = {}\n", "images = {}", "no image defined"),
    config_case(
        "shown-by-config-too",
        '[images.lab]\nidentifier = ".."\n',
        "images.lab.identifier = '..'",
        "is not a name",
        command="config",
    ),
    # --- command-line values
    Case(
        "config-file-missing",
        None,
        ("-c", "{tmp}/nope.toml", "build"),
        "{tmp}/nope.toml: (file)",
        "cannot read: No such file or directory",
        in_file=False,
    ),
    Case(
        "config-file-is-a-directory",
        None,
        ("-c", "{tmp}/adir", "config"),
        "{tmp}/adir: (file)",
        "cannot read: Is a directory",
        in_file=False,
    ),
    Case(
        "unknown-image",
        "",
        ("build", "nonexistent"),
        "images.nonexistent",
        "no such image; defined: debian-12",
    ),
    cli_case("output-option-is-a-file", ("build", "-o", "{tmp}/afile"), "'--output'", "is a file"),
    cli_case(
        "rebuild-layer", ("build", "--rebuild", "everything"), "'--rebuild'", "'everything' is not one of"
    ),
    cli_case(
        "boot-timeout-negative",
        ("boot", "{tmp}/afile", "--timeout", "-5"),
        "'--timeout'",
        "-5 is not in the range x>=1",
    ),
    cli_case(
        "boot-kernel-arg-via-bootloader",
        ("boot", "{tmp}/afile", "--kernel-arg", "rd.debug"),
        "--kernel-arg needs --via kernel",
        "the image's bootloader has its own command line",
    ),
    cli_case(
        "boot-kernel-arg-with-space",
        ("boot", "{tmp}/afile", "--via", "kernel", "--kernel-arg", "a b"),
        "--kernel-arg 'a b'",
        "expected one kernel argument",
    ),
    cli_case(
        "netboot-kernel-arg-too-long",
        ("netboot", "{tmp}/adir", "img", "--kernel-arg", "x=" + "y" * 2100),
        "--kernel-arg: the kernel command line would be 2102 bytes",
        "more than the kernel's 2047",
    ),
    cli_case("boot-directory", ("boot", "{tmp}/adir"), "{tmp}/adir", "is a directory"),
    cli_case("boot-missing-image", ("boot", "{tmp}/none.qcow2"), "{tmp}/none.qcow2", "does not exist"),
    cli_case(
        "boot-identifier",
        ("boot", "{tmp}/afile", "--identifier", "SLX SYS"),
        "'--identifier'",
        "no whitespace",
    ),
    cli_case(
        "inspect-identifier-dotdot",
        ("inspect", "{tmp}/afile", "--identifier", ".."),
        "'--identifier'",
        "'..' is not a name",
    ),
    cli_case("inspect-directory", ("inspect", "{tmp}/adir"), "{tmp}/adir", "is a directory"),
    config_case(
        "desktop-session",
        '[images.lab]\ndesktop = { session = "kde" }\n',
        "images.lab.desktop.session = 'kde'",
        "must be one of xfce or gnome",
    ),
    config_case(
        "desktop-browser",
        '[images.lab]\ndesktop = { browser = "yes" }\n',
        "images.lab.desktop.browser = 'yes'",
        "expected true or false",
    ),
    config_case(
        "desktop-not-apt",
        '[images.lab]\ndistribution = "rocky-9"\ndesktop = {}\n',
        "images.lab.desktop = {}",
        "desktop images are built for Debian and Ubuntu only, not rocky-9",
    ),
    cli_case(
        "boot-screenshot-not-png",
        ("boot", "{tmp}/afile", "--screenshot", "{tmp}/shot.jpg"),
        "--screenshot {tmp}/shot.jpg",
        "expected a file name ending in .png",
    ),
    cli_case(
        "boot-screenshot-no-folder",
        ("boot", "{tmp}/afile", "--screenshot", "{tmp}/nodir/shot.png"),
        "--screenshot {tmp}/nodir/shot.png",
        "{tmp}/nodir is not a writable folder",
    ),
    cli_case(
        "dnbd3-images-bad-host",
        ("dnbd3", "images", "not a host"),
        "server address 'not a host'",
        "is not a host name or IP address",
    ),
    cli_case(
        "dnbd3-images-bad-port",
        ("dnbd3", "images", "127.0.0.1:99999"),
        "server address '127.0.0.1:99999'",
        "port must be 1..65535",
    ),
    cli_case(
        "dnbd3-images-timeout",
        ("dnbd3", "images", "127.0.0.1", "--timeout", "0"),
        "'--timeout'",
        "not in the range x>0",
    ),
    cli_case(
        "dnbd3-verify-bad-host",
        ("dnbd3", "verify", "no such host", "img"),
        "server address 'no such host'",
        "is not a host name",
    ),
    cli_case(
        "dnbd3-verify-identifier",
        ("dnbd3", "verify", "127.0.0.1", "img", "--identifier", "-x"),
        "'--identifier'",
        "must not start with '-'",
    ),
]


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def _run(case: Case, tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "afile").write_text("not an image\n")
    (tmp / "adir").mkdir()
    args = [_fill(arg, tmp) for arg in case.args]
    if case.toml is not None:
        # Output and cache in the case's folder, so that a build that wrongly starts touches nothing shared.
        data = case.toml if isinstance(case.toml, bytes) else _fill(case.toml, tmp).encode()
        if b"[build]" not in data:
            data += f'\n[build]\noutput_dir = "{tmp}/out"\ncache_dir = "{tmp}/cache"\n'.encode()
        (tmp / "stage4.toml").write_bytes(data)
        args = ["-c", str(tmp / "stage4.toml"), *args]
    return run_stage4(*args, cwd=tmp, timeout=120)


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The selected cases, run a few at a time (each one is a Python start-up, mostly waiting for a core)."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input_is_one_line_naming_it"
    ]
    folders = {case.id: tmp_path_factory.mktemp(case.id) for case in selected}
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = {case.id: pool.submit(_run, case, folders[case.id]) for case in selected}
    return {name: (folders[name], future.result()) for name, future in done.items()}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_naming_it(results: dict, case: Case) -> None:
    tmp, result = results[case.id]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == case.code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"stage4: error: {tmp / 'stage4.toml'}: " if case.in_file else "stage4: error: "
    assert lines[0].startswith(prefix), lines[0]
    rest, key = lines[0].removeprefix(prefix), _fill(case.key, tmp)
    assert rest.startswith(key) if case.in_file else key in rest, lines[0]
    assert _fill(case.cause, tmp) in rest.removeprefix(key), lines[0]
    # Nothing of a build started: no output folder, nothing in the cache.
    assert not (tmp / "out").exists() and not (tmp / "output").exists()
    assert not (tmp / "cache").exists() or not any((tmp / "cache").rglob("*"))


def test_disk_size_beyond_the_work_filesystem_fails_before_the_bootstrap(tmp_path: Path) -> None:
    """ext4 (this host's /) allows files of at most 16 TiB: a 100T disk is refused before any step."""
    project = tmp_path / "stage4.toml"
    project.write_text(
        f'[build]\noutput_dir = "{tmp_path}/out"\ncache_dir = "{tmp_path}/cache"\n'
        '[machine]\ndisk_size = "100T"\n[images.lab]\n'
    )
    probe = tmp_path / "cache" / "probe"
    probe.parent.mkdir()
    try:
        with probe.open("wb") as handle:
            handle.truncate(100 << 40)
        pytest.skip(f"the filesystem of {tmp_path} holds a 100T file; the case needs one that does not")
    except OSError:
        pass
    finally:
        probe.unlink(missing_ok=True)
    result = run_stage4("-c", str(project), "build", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        (
            f"stage4: error: {project}: machine.disk_size = '100T': the filesystem of {tmp_path}/cache/work "
            "cannot "
            "hold a disk file that large (File too large)"
        )
    ]
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "cache" / "work").iterdir()) == []  # no bootstrap, no probe file left


def test_a_component_without_artifacts_is_warned_about(tmp_path: Path) -> None:
    project = tmp_path / "stage4.toml"
    project.write_text(COMPONENT)
    result = run_stage4("-c", str(project), "config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        (
            f"stage4: warning: {project}: images.lab.components.tool.artifacts: none given; "
            "the component is built "
            "in the dev layer but nothing of it is installed"
        )
    ]


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory nobody may create files in, root included (the immutable attribute)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "image.qcow2").write_text("not an image\n")
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(folder)], check=False).returncode != 0
    ):
        pytest.skip("needs chattr +i (root, a filesystem with the immutable attribute)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_boot_of_an_image_in_a_read_only_directory(read_only_dir: Path, tmp_path: Path) -> None:
    result = run_stage4("boot", str(read_only_dir / "image.qcow2"), cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        (
            f"stage4: error: {read_only_dir}/logs: cannot write the boot logs there "
            "(Operation not permitted); "
            "give --log FILE"
        )
    ]


def test_a_failed_step_leaves_its_cause_in_the_log(tmp_path: Path) -> None:
    """A file that is no disk image: the step that looks for its kernel fails, and the log says why."""
    image = tmp_path / "junk.qcow2"
    image.write_bytes(b"\0" * (1 << 20))
    serial = tmp_path / "logs" / "boot.serial.log"
    result = run_stage4("boot", str(image), "--log", str(serial), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    error = result.stderr.splitlines()[-1]
    assert error == f"stage4: error: extract kernel failed: {image} has no partition named 'SLX_SYS'"
    log = (tmp_path / "logs" / "boot.stage4.log").read_text()
    cause = error.removeprefix("stage4: error: ")
    assert "<== read junk.qcow2: failed after" in log
    assert log.splitlines()[-2].endswith(f": {cause}")  # the failed step, with its cause
    assert log.splitlines()[-1].endswith(f"stopped: {cause}")


# A multiboot kernel that writes what GRUB's menu writes (ANSI escape sequences) to the serial port,
# then halts.
CONSOLE_KERNEL = r"""
.section .text
.globl start
.align 4
    .long 0x1BADB002
    .long 0
    .long -0x1BADB002
start:
    mov $msg, %esi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  cli
    hlt
    jmp 2b
msg:
    .ascii "\033[2J\033[01;01H\033[0m\033[30m\033[47mGNU GRUB  version 2.06\033[m\r\n"
    .ascii "\033[7m*Debian GNU/Linux\033[0m\033[?25l\r\n\0"
"""


@pytest.mark.slow
def test_boot_timeout_shows_console_lines_without_escape_codes(tmp_path: Path) -> None:
    if not (shutil.which("as") and shutil.which("ld") and shutil.which("qemu-system-x86_64")):
        pytest.skip("needs as and ld (binutils) and qemu-system-x86_64")
    source = tmp_path / "kernel.S"
    source.write_text(CONSOLE_KERNEL)
    subprocess.run(["as", "--32", "-o", str(tmp_path / "kernel.o"), str(source)], check=True)
    kernel = tmp_path / "kernel.elf"
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_i386",
            "-Ttext",
            "0x100000",
            "-e",
            "start",
            "-o",
            str(kernel),
            str(tmp_path / "kernel.o"),
        ],
        check=True,
    )
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    project = tmp_path / "stage4.toml"
    project.write_text(f'[build]\ncache_dir = "{tmp_path}/cache"\n[machine]\naccelerator = "tcg"\n')
    result = run_stage4(
        "-c",
        str(project),
        "boot",
        str(image),
        "--kernel",
        str(kernel),
        "--identifier",
        "SLX_SYS",
        "--timeout",
        "3",
        "--log",
        str(tmp_path / "serial.log"),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "\x1b" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "stage4: error: boot failed: no userspace marker within 3 s; last console lines: "
        f"GNU GRUB  version 2.06 | *Debian GNU/Linux (log: {tmp_path / 'serial.log'})"
    )
    assert "\x1b[7m" in (tmp_path / "serial.log").read_text()  # the log keeps what the console got
