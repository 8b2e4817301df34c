"""Running Ansible on a layer: the generated play list, the inventory for either way, the run itself.

One `ansible-playbook` run per layer: stage4's roles and the user's playbooks in one generated
playbook, so Ansible starts once. Its output streams through the Runner into the display and the log.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage4.distributions import Distribution
from stage4.errors import StepFailed
from stage4.runner import Runner

ANSIBLE_DIR = Path(__file__).parent / "ansible"
ROLES_DIR = ANSIBLE_DIR / "roles"
REMOTE_TMP = "/tmp/.stage4-ansible"
BUILD_USER = "stage4-build"
BUILD_KEY_COMMENT = "stage4-build-key"

# One entry of the generated playbook (a play of stage4's roles or an import of the user's playbook), as
# Ansible reads it.
Play = dict[str, object]


@dataclass
class Target:
    """How Ansible reaches the layer: a chroot directory, or a VM's forwarded SSH port."""

    way: str
    root: Path | None = None
    port: int | None = None
    key: Path | None = None

    def inventory(self) -> dict[str, object]:
        host: dict[str, object] = {
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_remote_tmp": REMOTE_TMP,
        }
        if self.way == "chroot":
            host |= {"ansible_connection": "community.general.chroot", "ansible_host": str(self.root)}
        else:
            host |= {
                "ansible_connection": "ssh",
                "ansible_host": "127.0.0.1",
                "ansible_port": self.port,
                "ansible_user": BUILD_USER,
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_become": True,
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                "-o ConnectTimeout=30 -o ServerAliveInterval=15",
            }
        return {"all": {"hosts": {"layer": host}}}


def play(name: str, roles: list[str]) -> Play:
    """One play of stage4's roles. They gather no facts (most of a second in a chroot): what they read of
    the system, its package manager and release, stage4 knows from the config (`distribution_facts`)."""
    return {"name": name, "hosts": "all", "gather_facts": False, "roles": roles}


def distribution_facts(distribution: type[Distribution]) -> dict[str, str]:
    """What stage4's roles know of the system they run on, as variables."""
    return {
        "stage4_package_manager": distribution.package_manager,
        "stage4_distribution_release": distribution.release,
    }


def site(before: list[Play], playbooks: list[Path], after: list[Play]) -> list[Play]:
    """stage4's plays, the user's playbooks (imported as they are), stage4's closing plays."""
    imports: list[Play] = [{"import_playbook": str(p)} for p in playbooks]
    return [*before, *imports, *after]


def ansible_playbook() -> str:
    beside = Path(sys.executable).parent / "ansible-playbook"
    found = str(beside) if beside.exists() else shutil.which("ansible-playbook")
    if not found:
        raise StepFailed("provision", "ansible-playbook not found (run ./install.sh)")
    return found


@dataclass
class Prepared:
    """The files of one run in its work directory, and the environment ansible-playbook needs."""

    playbook: Path
    inventory: Path
    variables: Path
    env: dict[str, str]

    def argv(self) -> list[str | Path]:
        return [ansible_playbook(), "-i", self.inventory, "-e", f"@{self.variables}", self.playbook]


def prepare(target: Target, plays: list[Play], variables: dict[str, Any], work: Path) -> Prepared:
    """Write the playbook, inventory, variables and ansible.cfg of a run into `work`."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "site.yml").write_text(json.dumps(plays, indent=1), encoding="utf-8")
    (work / "inventory.json").write_text(json.dumps(target.inventory(), indent=1), encoding="utf-8")
    (work / "vars.json").write_text(json.dumps(variables, indent=1, default=str), encoding="utf-8")
    (work / "ansible.cfg").write_text(
        "[defaults]\n"
        f"roles_path = {ROLES_DIR}\n"
        f"local_tmp = {work / 'local-tmp'}\n"
        "host_key_checking = False\n"
        "retry_files_enabled = False\n"
        "nocows = True\n"
        "interpreter_python = /usr/bin/python3\n"
        "[ssh_connection]\n"
        "pipelining = True\n",
        encoding="utf-8",
    )
    env = {
        "ANSIBLE_CONFIG": str(work / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "PYTHONUNBUFFERED": "1",
        "ANSIBLE_NOCOLOR": "1",
        "LC_ALL": "C.UTF-8",
    }
    return Prepared(work / "site.yml", work / "inventory.json", work / "vars.json", env)


def run(
    target: Target, plays: list[Play], variables: dict[str, Any], work: Path, runner: Runner, step: str
) -> None:
    """Run `plays` against `target`; a failure is a StepFailed naming `step` and the build log."""
    prepared = prepare(target, plays, variables, work)
    try:
        runner.run(prepared.argv(), step=step, env=prepared.env)
    except StepFailed:
        raise StepFailed(step, _failure(runner.log_path), runner.log_path) from None


def _failure(log_path: Path | None) -> str:
    """The task that failed, from Ansible's output in the build log."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path else []
    start = max(
        (i for i, line in enumerate(lines) if "ansible-playbook" in line and " $ " in line), default=0
    )
    task, fatal = "", ""
    for line in lines[start:]:
        text = line.split(" ", 1)[-1].strip()
        if text.startswith("TASK ["):
            task = text.removeprefix("TASK [").split("]")[0]
        elif text.startswith(("fatal:", "failed:")) or "ERROR!" in text or text.startswith("[ERROR]"):
            text = _message(text)
            fatal = f"task '{task}': {text}" if task else text
    return "ansible-playbook failed" + (f"; {fatal[:1500]}" if fatal else "")


def _message(fatal: str) -> str:
    """The `msg` of a task result (`fatal: [host]: FAILED! => {...}`), else the line as it is."""
    _, _, result = fatal.partition(" => ")
    try:
        parsed = json.loads(result)
        message, stderr = parsed.get("msg"), parsed.get("stderr")
    except (ValueError, AttributeError):
        return fatal
    if not (isinstance(message, str) and message):
        return fatal
    # A command's own reason (apt-get: "E: Unable to locate package ...") says more than its exit status.
    reason = [line for line in stderr.splitlines() if line.strip()] if isinstance(stderr, str) else []
    return f"{message}: {reason[-1].strip()}" if reason else message
