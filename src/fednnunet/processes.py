"""Starting, watching and stopping the Flower processes (and their private folders) of this program.

Why a module of its own: the coordinator (:mod:`fednnunet.federation.server_node`, and the one-machine
federation of :mod:`fednnunet.federation.local`) and a hospital's site process (:mod:`fednnunet.site.supernode`)
both start Flower processes, keep their secrets in folders readable by this user only, and must never leave a
process running once they end. These tools are all that both share, so a hospital's process imports nothing of
the coordinator.

Every process gets a session of its own (so that its whole tree is stopped on exit, on failure and on Ctrl-C,
which reaches only the launcher) and, on Linux, dies with its parent (:func:`die_with_parent`).
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

#: Coordinator state that must be this user's only: created with this umask (folders 0700, files 0600) by the
#: coordinator and everything it starts (the SuperLink creates its database with the process umask).
PRIVATE_UMASK = 0o077


class ProcessError(RuntimeError):
    """A process started here exited, or did not come up in time; the message names it (with its last log lines)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def executable(name: str) -> str:
    """An executable of this environment (the venv's bin folder first, then PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def tool_env() -> dict[str, str]:
    """This process's environment with this environment's bin folder first on PATH: Flower's processes start
    their helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


_private_folders: set[Path] = set()


def private_folder(prefix: str) -> Path:
    """A new folder for secrets and keys, readable by this user only (mode 0700), removed when this process ends.

    Why a registry and not only the owner's ``stop()``: a site worker ends by SIGTERM through the signal's default
    action (see :func:`fednnunet.site.worker.install_sigterm_handling`), which runs no ``finally`` and no atexit;
    it calls :func:`remove_private_folders` first, so no SuperExec secret is left behind in the temp folder.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _private_folders.add(path)
    return path


def remove_private_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _private_folders.discard(path)


def remove_private_folders() -> None:
    """Remove every folder :func:`private_folder` made in this process (at exit, and before dying of a signal)."""
    for path in list(_private_folders):
        remove_private_folder(path)


atexit.register(remove_private_folders)


def make_private(folder: Path) -> Path:
    """``folder`` (created if needed) readable and writable by this user only (0700)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def write_secret(folder: Path) -> Path:
    """A new random SuperExec auth secret in ``folder`` (made private: mode 0700), readable by this user only."""
    path = make_private(folder) / "superexec.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def start_logged(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` with ``env``, its output (stdout and stderr) appended to ``log`` and no input, in a session of
    its own, dying with this process on Linux (:func:`die_with_parent`)."""
    with log.open("ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=die_with_parent if sys.platform == "linux" else None)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


class StartStop:
    """``with X(...) as x:`` starts on entry (stopping what did start if starting fails) and stops on exit."""

    def start(self) -> "StartStop":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the started object itself
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProcessGroup(StartStop):
    """Processes started for one role, each logged to ``workdir/logs/<name>.log`` and stopped together."""

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr_home"
        self.extra_env = dict(extra_env or {})
        self._procs: list[_Proc] = []

    def env(self, home: str) -> dict[str, str]:
        env = tool_env()
        env["FLWR_HOME"] = str(self.flwr_home / home)
        env.update(self.extra_env)
        (self.flwr_home / home).mkdir(parents=True, exist_ok=True)
        return env

    def start_process(self, name: str, cmd: list[str], env: dict[str, str]) -> _Proc:
        log = self.logs / f"{name}.log"
        popen = start_logged(cmd, log, env)
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        logger.debug("started %s (pid %d): %s", name, popen.pid, " ".join(cmd))
        return proc

    def check_alive(self) -> None:
        for p in self._procs:
            code = p.popen.poll()
            if code is not None:
                raise ProcessError(f"{p.name} exited with code {code}; last log lines:\n{tail(p.log)}")

    def stop(self) -> None:
        terminate_all([p.popen for p in reversed(self._procs)])
        self._procs.clear()


def wait_listening(group: ProcessGroup, host: str, port: int, what: str, timeout_s: float = 60.0) -> None:
    """Wait until ``host:port`` accepts connections; fail early if a process of ``group`` died."""
    deadline = time.monotonic() + timeout_s
    while not _port_open(host, port):
        group.check_alive()
        if time.monotonic() > deadline:
            raise ProcessError(f"{what} not listening on {host}:{port} after {timeout_s:.0f} s")
        time.sleep(0.1)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def die_with_parent() -> None:
    """Run in a started process before it executes (Linux): it gets SIGTERM when its parent dies, even by
    SIGKILL, so that a killed ``fednnunet`` never leaves a SuperLink, SuperNode or worker running on its own
    (they run in their own sessions so that a Ctrl-C reaches only the launcher, which stops them in order)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def terminate_all(popens: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Stop processes and everything they started: SIGTERM to all at once, SIGKILL to those still running
    ``grace_s`` later (one shared grace period, not one per process).

    Signals go to each process's session and, separately, to every descendant: Flower's SuperExec starts the
    ServerApp in a session of its own, which a group signal does not reach (it outlived interrupted runs).
    """
    running = [p for p in popens if p.poll() is None]
    strays = [pid for p in running for pid in descendants(p.pid)]
    for popen in running:
        _signal_group(popen, signal.SIGTERM)
    _signal_pids(strays, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for popen in running:
        try:
            popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(popen, signal.SIGKILL)
            popen.wait()
    _signal_pids([pid for pid in strays if is_running(pid)], signal.SIGKILL)


def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, parent pid, ...); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (fields := _proc_stat(entry.name)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def is_running(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may never be reaped in a container)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, for a person ("(no log)" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
