"""`sightline service install`: the systemd unit, service user, config and daemon key.

`plan_install` looks at the machine and returns the steps (files to write, commands to
run) without changing anything; `--dry-run` prints them, a real install applies them.
Slow-path admin code: nothing here is imported by the daemon.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from runtime.errors import SightlineError

UNIT_PATH = Path("/etc/systemd/system/sightline.service")
DEFAULT_CONFIG = Path("/etc/sightline/sightline.toml")
# Must match the unit template: StateDirectory=sightline and SIGHTLINE_KEYS_DIR.
STATE_DIR = Path("/var/lib/sightline")
KEYS_DIR = STATE_DIR / "keys"
DAEMON_KEY = "daemon.key_secret"
GPU_GROUP = "video"  # owns /dev/nvhost-* and /dev/nvmap on Jetson (root:video 0660)
# The unit hides these from the service (ProtectHome=yes, PrivateTmp=yes): a `sightline`
# installed under them cannot be started by it.
HIDDEN_PREFIXES = (Path("/home"), Path("/root"), Path("/run/user"), Path("/tmp"),
                   Path("/var/tmp"))


def read_template(name: str) -> str:
    return resources.files("runtime").joinpath("data", name).read_text()


@dataclass(frozen=True)
class WriteFile:
    path: Path
    content: str
    mode: int
    why: str

    def describe(self) -> str:
        return f"write {self.path} (mode {self.mode:04o}): {self.why}"


@dataclass(frozen=True)
class RunCommand:
    argv: tuple[str, ...]
    why: str

    def describe(self) -> str:
        return f"run: {shlex.join(self.argv)}  ({self.why})"


Step = WriteFile | RunCommand


@dataclass(frozen=True)
class InstallPlan:
    steps: tuple[Step, ...]
    unit: str
    problems: tuple[str, ...] = ()  # a real install refuses while there are any
    notes: tuple[str, ...] = ()
    next_steps: tuple[str, ...] = ()


def sightline_executable() -> Path:
    """The installed `sightline` command of this very installation (venv or system)."""
    beside = Path(sys.executable).parent / "sightline"  # not resolved: keep the venv's bin
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("sightline")
    if found:
        return Path(found).absolute()
    raise SightlineError("cannot find the installed `sightline` command next to "
                         f"{sys.executable} or on PATH; install the package with pip first")


def render_unit(executable: Path, config: Path, user: str, group: str) -> str:
    exec_start = str(executable)
    if any(ch.isspace() for ch in exec_start):
        exec_start = f'"{exec_start}"'
    unit = read_template("sightline.service")
    for placeholder, value in (("@EXEC_START@", exec_start), ("@CONFIG@", str(config)),
                               ("@USER@", user), ("@GROUP@", group)):
        unit = unit.replace(placeholder, value)
    return unit


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _group(name: str) -> grp.struct_group | None:
    try:
        return grp.getgrnam(name)
    except KeyError:
        return None


def _nologin() -> str:
    for shell in ("/usr/sbin/nologin", "/sbin/nologin"):
        if Path(shell).exists():
            return shell
    return "/bin/false"


def _keys_dir_for(config: Path) -> Path | None:
    """Where the daemon will look for its CURVE key; None when the config is plain."""
    if not config.is_file():
        return KEYS_DIR  # the default config we are about to write uses CURVE
    from runtime.config import load_config

    security = load_config(config).security
    if security.mode == "plain":
        return None
    return Path(security.keys_dir) if security.keys_dir else KEYS_DIR


def plan_install(user: str = "sightline", config: Path = DEFAULT_CONFIG,
                 executable: Path | None = None, unit_path: Path = UNIT_PATH) -> InstallPlan:
    """What `sightline service install` would do on this machine; changes nothing."""
    executable = executable or sightline_executable()
    config = config.absolute()
    steps: list[Step] = []
    notes: list[str] = []
    problems = [
        f"{executable} is under {prefix}, which the service cannot see (the unit sets "
        "ProtectHome=yes and PrivateTmp=yes): install sightline elsewhere, e.g. "
        "`python3 -m venv /opt/sightline && /opt/sightline/bin/pip install sightline`, and run "
        "that installation's `sightline service install`"
        for prefix in HIDDEN_PREFIXES if executable.is_relative_to(prefix)
    ]

    account = _user(user)
    gpu_group = _group(GPU_GROUP)
    if account is None:
        group = user
        argv = ["useradd", "--system", "--user-group", "--home-dir", str(STATE_DIR),
                "--no-create-home", "--shell", _nologin(), "--comment",
                "Sightline inference daemon"]
        if gpu_group is not None:
            argv += ["--groups", GPU_GROUP]
        steps.append(RunCommand((*argv, user), f"create the unprivileged service user {user}"))
    else:
        group = grp.getgrgid(account.pw_gid).gr_name
        notes.append(f"user {user} exists (group {group}); keeping it")
        if gpu_group is not None and user not in gpu_group.gr_mem \
                and account.pw_gid != gpu_group.gr_gid:
            steps.append(RunCommand(("usermod", "--append", "--groups", GPU_GROUP, user),
                                    f"GPU device nodes on Jetson belong to group {GPU_GROUP}"))

    if config.exists():
        notes.append(f"{config} exists; keeping it")
    else:
        steps.append(WriteFile(config, read_template("sightline.toml"), 0o644,
                               "default configuration (edit it, then restart the service)"))

    keys_dir = _keys_dir_for(config)
    if keys_dir is not None:
        if (keys_dir / DAEMON_KEY).exists():
            notes.append(f"daemon key {keys_dir / DAEMON_KEY} exists; keeping it")
        else:
            steps.append(RunCommand(
                (str(executable), "keys", "daemon", "--keys", str(keys_dir)),
                "make the daemon's CURVE keypair; headsets need its public key"))
        # Every time, so an install interrupted after making the key still fixes ownership.
        steps.append(RunCommand(("chown", "-R", f"{user}:{group}", str(keys_dir)),
                                "the keys belong to the service user"))

    unit = render_unit(executable, config, user, group)
    steps.append(WriteFile(unit_path, unit, 0o644, "the systemd unit"))
    steps.append(RunCommand(("systemctl", "daemon-reload"), "make systemd read the unit"))

    next_steps = ["systemctl enable --now sightline", "sightline status",
                  "journalctl -u sightline -f"]
    if keys_dir is not None:
        next_steps.append(f"sightline keys headset NAME --keys {keys_dir}   "
                          "(enrol each headset)")
    return InstallPlan(tuple(steps), unit, tuple(problems), tuple(notes), tuple(next_steps))


def format_plan(plan: InstallPlan, dry_run: bool) -> str:
    lines = ["dry run: nothing is changed. sightline service install would:" if dry_run
             else "installing the sightline service:"]
    for number, step in enumerate(plan.steps, 1):
        lines.append(f"  {number}. {step.describe()}")
        if dry_run and isinstance(step, WriteFile) and step.path.suffix == ".service":
            lines.extend(f"       | {line}" if line else "       |"
                         for line in step.content.splitlines())
    lines.extend(f"  note: {note}" for note in plan.notes)
    lines.extend(f"  problem: {problem}" for problem in plan.problems)
    return "\n".join(lines)


def _write(step: WriteFile) -> None:
    step.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Atomic: a half-written unit must never be what systemd reads.
    fd, temporary = tempfile.mkstemp(dir=step.path.parent, prefix=f".{step.path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(step.content)
        os.chmod(temporary, step.mode)
        os.replace(temporary, step.path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def apply_plan(plan: InstallPlan, echo: Callable[[str], None] = print,
               run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Carry out the steps in order; stop at the first that fails, saying which."""
    if plan.problems:
        raise SightlineError("not installing: " + "; ".join(plan.problems))
    for number, step in enumerate(plan.steps, 1):
        echo(f"  {number}. {step.describe()}")
        if isinstance(step, WriteFile):
            _write(step)
            continue
        try:
            done = run(list(step.argv), capture_output=True, text=True)
        except FileNotFoundError:
            raise SightlineError(f"step {number} failed: {step.argv[0]} not found (is this a "
                                 "systemd machine with the shadow utilities?)") from None
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip()
            raise SightlineError(f"step {number} failed ({shlex.join(step.argv)} exited with "
                                 f"{done.returncode}): {output}; steps before it are done, "
                                 "re-running the install continues from there")


def require_root() -> None:
    if os.geteuid() != 0:
        raise SightlineError("installing the service changes /etc and creates a system user: "
                             "run it as root (sudo), or add --dry-run to see what it would do")
