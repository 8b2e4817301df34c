"""SSH host keys for one stage4 VM boot, made on the build host and handed to the guest through fw_cfg.

An image carries no host keys: a machine makes its own before its sshd first starts (the base's
stage4-ssh-host-keys.service, builders/bootstrap.py). Under TCG the guest needs 4-22 s for the 3072-bit
RSA key, and sshd, so multi-user.target and the marker wait for it; the build host makes the same set in
about a second (0.6-3.1 s here). So every stage4 VM boot (boot, netboot, the VM way) offers a fresh set
made for that boot only, which the guest takes when it has none yet. A real client has no fw_cfg and makes
its own, as before.
"""

from __future__ import annotations

import base64
import hashlib
import tarfile
from pathlib import Path

from stage4.runner import Runner

FW_CFG_NAME = "opt/org.stage4/ssh-host-keys"
# What `ssh-keygen -A` makes on Debian 12 (OpenSSH 9.2): the guest's sshd sees the set a real client has.
KEY_TYPES = ("rsa", "ecdsa", "ed25519")


def fw_cfg_argv(directory: Path, runner: Runner, step: str) -> list[str]:
    """qemu's -fw_cfg option offering a new set of host keys, made in DIRECTORY (which must outlive qemu's
    start: qemu reads the file then)."""
    keys = directory / "ssh-host-keys"
    keys.mkdir(mode=0o700)
    for kind in KEY_TYPES:
        # No comment: ssh-keygen's default names the build host.
        key = keys / f"ssh_host_{kind}_key"
        runner.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "", "-f", key], step=step)
    archive = directory / "ssh-host-keys.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(keys.iterdir()):
            info = tar.gettarinfo(path, arcname=path.name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return ["-fw_cfg", f"name={FW_CFG_NAME},file={archive}"]


def fingerprint(directory: Path) -> str:
    """The SHA256 fingerprint of the ed25519 key offered from DIRECTORY, as `ssh-keygen -l` prints it."""
    blob = (directory / "ssh-host-keys" / "ssh_host_ed25519_key.pub").read_text(encoding="ascii").split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
